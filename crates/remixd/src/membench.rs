//! `remixd bench memory`: the resident memory of a real `remixd serve` process through
//! the bursts that a hostile test run used against it, printed, never asserted.
//!
//! Each scenario starts its own server (this same executable, `serve`, on a free
//! loopback port with a temporary data directory), reads its `VmRSS` from `/proc`
//! before, its `VmHWM` (peak) after, and its `VmRSS` again 0.5, 3 and 15 s after the burst,
//! so what the process gives back shows. The scenarios:
//!
//! - one task with all 13 image slots (base, reference, mask, ten style images) on the
//!   same 6000×6000 16-bit PNG (an upload of a few hundred KB), with the default
//!   settings (the per-task pixel budget refuses it from the headers) and with
//!   `fetch.max_task_pixels` raised so that all 13 images are decoded;
//! - 40 concurrent base64 uploads of a 10 MB PNG: from one account and from 40 accounts
//!   with the default upload limits, and with every upload limit off.
//!
//! `--keep-freed` runs the servers with `MIMALLOC_PURGE_DELAY=-1`, the allocator setting
//! a local-engine process uses, for comparison. `--server-exe PATH` runs another build
//! of remixd as the server (an older one, to compare); the scenarios that need settings
//! that build may not know are skipped then.

use std::io::Cursor;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use image::ImageEncoder;
use remixd_domain::{now_millis, KeyLimits};
use serde_json::{json, Value};

use crate::settings::Settings;

/// `VmRSS` and `VmHWM` of a process, in MiB.
pub(crate) fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (Linux only)"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} in /proc/{pid}/status"))?;
        let kb: f64 = line
            .split_whitespace()
            .nth(1)
            .context("a number of kB")?
            .parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A `remixd serve` child on a temporary data directory.
struct Server {
    child: tokio::process::Child,
    base: String,
    key: String,
    settings: Settings,
    _dir: tempfile::TempDir,
}

impl Server {
    /// `extra` holds further settings, `(section, "key = value")`.
    async fn start(run: &Run, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let settings = Settings {
            data_dir: dir.path().join("data"),
            ..Settings::default()
        };
        // Only the keys that differ from the defaults, so that an older build reads it.
        let mut config = format!(
            "data_dir = {:?}\n[server]\nlisten = \"127.0.0.1:{port}\"\n",
            settings.data_dir.display().to_string()
        );
        let mut sections: Vec<(&str, Vec<&str>)> = vec![(
            "limits",
            vec!["create_per_10s = 1000", "query_per_s = 1000"],
        )];
        for (section, line) in extra {
            match sections.iter_mut().find(|(s, _)| s == section) {
                Some((_, lines)) => lines.push(line),
                None => sections.push((section, vec![line])),
            }
        }
        for (section, lines) in sections {
            config.push_str(&format!("[{section}]\n{}\n", lines.join("\n")));
        }
        let path = dir.path().join("remixd.toml");
        std::fs::write(&path, config)?;
        let config = path;
        let exe = match &run.server_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe()?,
        };
        let keep_freed = run.keep_freed;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if keep_freed {
            cmd.env("MIMALLOC_PURGE_DELAY", "-1");
        } else {
            cmd.env_remove("MIMALLOC_PURGE_DELAY");
        }
        let child = cmd.spawn().context("starting remixd serve")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let key = std::fs::read_to_string(settings.data_dir.join("default.key"))?
            .trim()
            .to_string();
        Ok(Self {
            child,
            base,
            key,
            settings,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Keys of `n` new accounts.
    async fn accounts(&self, n: usize) -> anyhow::Result<Vec<String>> {
        let store = crate::open_store(&self.settings).await?;
        let mut keys = Vec::new();
        for i in 0..n {
            let name = format!("bench-{i}");
            store
                .create_account(&crate::uuid_like(), &name, 1000, now_millis())
                .await?;
            let (token, rec) = remixd_api::auth::generate_key(&name, "bench", KeyLimits::default());
            store.create_key(rec, now_millis()).await?;
            keys.push(token.0);
        }
        Ok(keys)
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// How the scenarios run.
struct Run {
    keep_freed: bool,
    server_exe: Option<std::path::PathBuf>,
}

/// Prints one scenario's line: RSS before, peak, and after the burst.
async fn report(name: &str, srv: &Server, before: f64, outcome: &str) -> anyhow::Result<()> {
    let (_, peak) = rss_mib(srv.pid())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after_half, _) = rss_mib(srv.pid())?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (after_3, _) = rss_mib(srv.pid())?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (after_15, _) = rss_mib(srv.pid())?;
    println!(
        "{name:<42} before {before:6.1}  peak {peak:6.1}  +0.5 s {after_half:6.1}  +3 s {after_3:6.1}  +15 s {after_15:6.1} MiB   {outcome}"
    );
    Ok(())
}

fn png(img: image::DynamicImage) -> anyhow::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// 6000×6000, 16 bits per channel, in flat bands: a few hundred KB that decode to
/// 216 MB of 16-bit samples.
fn huge_png() -> anyhow::Result<Vec<u8>> {
    let colours = [
        [0x1000u16, 0x8000, 0xf000],
        [0xf000, 0x2000, 0x4000],
        [0x8000, 0x8000, 0x8000],
        [0x3000, 0xc000, 0x2000],
    ];
    let img = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(6000, 6000, |_, y| {
        image::Rgb(colours[(y / 1500) as usize])
    });
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut out,
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::Sub,
    )
    .write_image(
        // The encoder takes 16-bit samples as native-endian bytes.
        &img.as_raw()
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect::<Vec<u8>>(),
        6000,
        6000,
        image::ExtendedColorType::Rgb16,
    )?;
    Ok(out)
}

/// Noise: a PNG that stays near its raw size, just under 10 MB.
fn ten_mb_png() -> anyhow::Result<Vec<u8>> {
    let mut s = 0x2545_f491u32;
    let img = image::RgbImage::from_fn(1800, 1800, |_, _| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        image::Rgb([s as u8, (s >> 8) as u8, (s >> 16) as u8])
    });
    png(image::DynamicImage::ImageRgb8(img))
}

async fn task_scenario(
    run: &Run,
    name: &str,
    bytes: &Bytes,
    extra: &[(&str, &str)],
) -> anyhow::Result<()> {
    if run.server_exe.is_some() && !extra.is_empty() {
        println!("{name:<42} skipped: it needs settings another build may not know");
        return Ok(());
    }
    let srv = Server::start(run, extra).await?;
    let http = reqwest::Client::new();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::stream(bytes.clone()).file_name("huge.png"),
        )
        .text("uploadPath", "bench");
    let up: Value = http
        .post(format!("{}/api/file-stream-upload", srv.base))
        .bearer_auth(&srv.key)
        .multipart(form)
        .send()
        .await?
        .json()
        .await?;
    let url = up["data"]["downloadUrl"]
        .as_str()
        .with_context(|| format!("upload failed: {up}"))?
        .to_string();
    let before = rss_mib(srv.pid())?.0;
    let styles: Vec<&str> = (0..10).map(|_| url.as_str()).collect();
    let body = json!({"model": "ideogram/character-remix", "input": {
        "prompt": "bench", "image_url": url, "reference_image_urls": [url],
        "reference_mask_urls": url, "image_urls": styles, "image_size": "square_hd"}});
    let created: Value = http
        .post(format!("{}/api/v1/jobs/createTask", srv.base))
        .bearer_auth(&srv.key)
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    let id = created["data"]["taskId"]
        .as_str()
        .with_context(|| format!("createTask failed: {created}"))?
        .to_string();
    let started = Instant::now();
    let outcome = loop {
        let r: Value = http
            .get(format!("{}/api/v1/jobs/recordInfo?taskId={id}", srv.base))
            .bearer_auth(&srv.key)
            .send()
            .await?
            .json()
            .await?;
        match r["data"]["state"].as_str() {
            Some("success") => break "task success".to_string(),
            Some("fail") => {
                break format!(
                    "task fail {}: {}",
                    r["data"]["failCode"].as_str().unwrap_or(""),
                    r["data"]["failMsg"].as_str().unwrap_or("")
                )
            }
            _ => {}
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the task never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let outcome = format!("{outcome} ({:.1} s)", started.elapsed().as_secs_f64());
    report(name, &srv, before, &outcome).await?;
    srv.stop().await;
    Ok(())
}

async fn upload_scenario(
    run: &Run,
    name: &str,
    body: &Bytes,
    accounts: usize,
    extra: &[(&str, &str)],
) -> anyhow::Result<()> {
    if run.server_exe.is_some() && !extra.is_empty() {
        println!("{name:<42} skipped: it needs settings another build may not know");
        return Ok(());
    }
    let srv = Server::start(run, extra).await?;
    let keys = if accounts <= 1 {
        vec![srv.key.clone()]
    } else {
        srv.accounts(accounts).await?
    };
    let before = rss_mib(srv.pid())?.0;
    let http = reqwest::Client::new();
    let started = Instant::now();
    let sends = (0..40).map(|i| {
        let (http, key, body) = (http.clone(), keys[i % keys.len()].clone(), body.clone());
        let url = format!("{}/api/file-base64-upload", srv.base);
        async move {
            http.post(url)
                .bearer_auth(key)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    });
    let statuses = futures::future::join_all(sends).await;
    let mut counts = std::collections::BTreeMap::new();
    for s in statuses {
        *counts.entry(s).or_insert(0) += 1;
    }
    let outcome = format!(
        "HTTP {} ({:.1} s)",
        counts
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(" "),
        started.elapsed().as_secs_f64()
    );
    report(name, &srv, before, &outcome).await?;
    srv.stop().await;
    Ok(())
}

/// Runs every scenario and prints one line each.
pub async fn memory(
    keep_freed: bool,
    server_exe: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new("/proc/self/status").exists(),
        "bench memory reads /proc and runs on Linux only"
    );
    let run = Run {
        keep_freed,
        server_exe,
    };
    let huge = Bytes::from(huge_png()?);
    let big = ten_mb_png()?;
    println!(
        "inputs: 6000x6000 16-bit PNG of {} KB; noise PNG of {:.2} MB ({} bytes of base64){}{}",
        huge.len() / 1024,
        big.len() as f64 / 1e6,
        big.len().div_ceil(3) * 4,
        if keep_freed {
            "; servers keep freed memory (MIMALLOC_PURGE_DELAY=-1)"
        } else {
            ""
        },
        match &run.server_exe {
            Some(p) => format!("; server: {}", p.display()),
            None => String::new(),
        }
    );
    use base64::Engine as _;
    let body = Bytes::from(
        json!({"base64Data": base64::engine::general_purpose::STANDARD.encode(&big),
               "uploadPath": "bench"})
        .to_string(),
    );
    drop(big);
    let no_upload_limits = [
        ("limits", "uploads_per_10s = 0"),
        ("limits", "upload_quota_bytes = 0"),
        ("limits", "uploads_in_flight_per_account = 0"),
        ("limits", "uploads_in_flight = 0"),
    ];
    task_scenario(&run, "13-slot task, defaults", &huge, &[]).await?;
    task_scenario(
        &run,
        "13-slot task, max_task_pixels 500 M",
        &huge,
        &[("fetch", "max_task_pixels = 500000000")],
    )
    .await?;
    upload_scenario(
        &run,
        "40 base64 uploads, 1 account, defaults",
        &body,
        1,
        &[],
    )
    .await?;
    upload_scenario(
        &run,
        "40 base64 uploads, 40 accounts, defaults",
        &body,
        40,
        &[],
    )
    .await?;
    upload_scenario(
        &run,
        "40 base64 uploads, 40 accounts, no limits",
        &body,
        40,
        &no_upload_limits,
    )
    .await?;
    Ok(())
}
