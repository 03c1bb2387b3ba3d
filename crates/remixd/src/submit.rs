//! `remixd submit`: a client of the task API, usable against any server that speaks the
//! contract. Local files are uploaded (`/api/file-stream-upload`), URLs are passed on;
//! the task is followed over the SSE stream with a progress bar, falling back to polling
//! recordInfo when the server has no stream; the images are downloaded into `--out`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

/// What to submit (the flags of `remixd submit`).
#[derive(Debug, Clone, clap::Args)]
pub struct SubmitArgs {
    /// Base image: a local file or an http(s) URL.
    #[arg(long)]
    pub image: String,
    /// Character reference: a local file or an http(s) URL.
    #[arg(long)]
    pub character: String,
    /// Mask of the character (white = character).
    #[arg(long)]
    pub mask: Option<String>,
    /// Style reference images (repeatable).
    #[arg(long = "style")]
    pub styles: Vec<String>,
    #[arg(long)]
    pub prompt: String,
    /// image_size: square, square_hd, portrait_4_3, portrait_16_9, landscape_4_3, landscape_16_9.
    #[arg(long)]
    pub size: Option<String>,
    /// rendering_speed: TURBO, BALANCED or QUALITY.
    #[arg(long)]
    pub speed: Option<String>,
    /// style: AUTO, REALISTIC or FICTION.
    #[arg(long = "style-type")]
    pub style_type: Option<String>,
    /// num_images, 1 to 4.
    #[arg(long)]
    pub num: Option<u8>,
    #[arg(long)]
    pub seed: Option<u32>,
    #[arg(long)]
    pub strength: Option<f64>,
    /// Server base URL (default: server.public_url, or http://<server.listen>).
    #[arg(long)]
    pub server: Option<String>,
    /// API key (default: $REMIXD_KEY, or <data_dir>/default.key).
    #[arg(long)]
    pub key: Option<String>,
    /// Where to write the images.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

fn envelope_data(v: &Value, what: &str) -> anyhow::Result<Value> {
    anyhow::ensure!(
        v["code"] == 200,
        "{what}: {} (code {})",
        v["msg"].as_str().unwrap_or("?"),
        v["code"]
    );
    Ok(v["data"].clone())
}

/// Uploads a local file, or passes a URL on.
async fn input_url(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    given: &str,
) -> anyhow::Result<String> {
    if given.starts_with("http://") || given.starts_with("https://") {
        return Ok(given.to_string());
    }
    let path = Path::new(given);
    let bytes = tokio::fs::read(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_string();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name(name),
        )
        .text("uploadPath", "remixd-submit");
    let v: Value = http
        .post(format!("{base}/api/file-stream-upload"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .with_context(|| format!("uploading {}", path.display()))?
        .json()
        .await
        .with_context(|| format!("uploading {}: the answer is not JSON", path.display()))?;
    anyhow::ensure!(
        v["success"] == true,
        "uploading {}: {}",
        path.display(),
        v["msg"].as_str().unwrap_or("failed")
    );
    v["data"]["downloadUrl"]
        .as_str()
        .map(str::to_string)
        .context("the upload answer has no downloadUrl")
}

/// Follows the task on the SSE stream; `None` when the server offers no stream.
async fn follow_stream(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    bar: &ProgressBar,
) -> Option<Value> {
    let resp = http
        .get(format!("{base}/api/v1/jobs/stream"))
        .query(&[("taskId", id)])
        .bearer_auth(key)
        .send()
        .await
        .ok()?;
    let is_sse = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if !resp.status().is_success() || !is_sse {
        return None;
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut last = None;
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.ok()?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let data: String = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect();
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                show(bar, &v);
                if matches!(v["state"].as_str(), Some("success" | "fail")) {
                    return Some(v);
                }
                last = Some(v);
            }
        }
    }
    // The stream broke before the end: let polling finish the job.
    let _ = last;
    None
}

fn show(bar: &ProgressBar, v: &Value) {
    bar.set_position(v["progress"].as_u64().unwrap_or(0));
    bar.set_message(v["state"].as_str().unwrap_or("?").to_string());
}

async fn poll(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Value> {
    loop {
        let r = http
            .get(format!("{base}/api/v1/jobs/recordInfo"))
            .query(&[("taskId", id)])
            .bearer_auth(key)
            .send()
            .await?;
        let wait = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let v: Value = r.json().await?;
        if v["code"] == 429 {
            tokio::time::sleep(Duration::from_secs(wait.unwrap_or(1))).await;
            continue;
        }
        let data = envelope_data(&v, "recordInfo")?;
        show(bar, &data);
        if matches!(data["state"].as_str(), Some("success" | "fail")) {
            return Ok(data);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `remixd submit`.
pub async fn run(
    args: SubmitArgs,
    default_base: String,
    default_key_file: PathBuf,
) -> anyhow::Result<()> {
    let base = args.server.clone().unwrap_or(default_base);
    let key = match (&args.key, std::env::var("REMIXD_KEY")) {
        (Some(k), _) => k.clone(),
        (None, Ok(k)) if !k.is_empty() => k,
        _ => std::fs::read_to_string(&default_key_file)
            .with_context(|| {
                format!(
                    "no --key, no REMIXD_KEY, and cannot read {}",
                    default_key_file.display()
                )
            })?
            .trim()
            .to_string(),
    };
    let client = Client::new(&base, &key)?;
    let (http, base, key) = (&client.http, client.base.as_str(), client.key.as_str());
    let mut input = Map::new();
    input.insert("prompt".into(), json!(args.prompt));
    input.insert(
        "image_url".into(),
        json!(input_url(http, base, key, &args.image).await?),
    );
    input.insert(
        "reference_image_urls".into(),
        json!([input_url(http, base, key, &args.character).await?]),
    );
    if let Some(m) = &args.mask {
        input.insert(
            "reference_mask_urls".into(),
            json!(input_url(http, base, key, m).await?),
        );
    }
    if !args.styles.is_empty() {
        let mut urls = Vec::new();
        for s in &args.styles {
            urls.push(input_url(http, base, key, s).await?);
        }
        input.insert("image_urls".into(), json!(urls));
    }
    for (k, v) in [
        ("image_size", &args.size),
        ("rendering_speed", &args.speed),
        ("style", &args.style_type),
    ] {
        if let Some(v) = v {
            input.insert(k.into(), json!(v));
        }
    }
    if let Some(n) = args.num {
        input.insert("num_images".into(), json!(n.to_string()));
    }
    if let Some(s) = args.seed {
        input.insert("seed".into(), json!(s));
    }
    if let Some(s) = args.strength {
        input.insert("strength".into(), json!(s));
    }
    let body = json!({"model": remixd_domain::MODEL_NAME, "input": input});
    let id = client.create(&body).await?;
    eprintln!("task {id}");
    let record = client.follow(&id).await?;
    if record["state"] != "success" {
        anyhow::bail!(
            "task {id} failed ({}): {}",
            record["failCode"].as_str().unwrap_or(""),
            record["failMsg"].as_str().unwrap_or("")
        );
    }
    for path in client.download(&id, &record, &args.out).await? {
        println!("{}", path.display());
    }
    Ok(())
}

/// A client of the task API, shared by `submit`, `demo` and `bench`.
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub key: String,
}

impl Client {
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
        })
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{} did not become ready",
                self.base
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// createTask; the new task's id.
    pub async fn create(&self, body: &Value) -> anyhow::Result<String> {
        let v: Value = self
            .http
            .post(format!("{}/api/v1/jobs/createTask", self.base))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?
            .json()
            .await?;
        Ok(envelope_data(&v, "createTask")?["taskId"]
            .as_str()
            .context("no taskId")?
            .to_string())
    }

    /// Follows a task to its end with a progress bar: the SSE stream, else polling.
    pub async fn follow(&self, id: &str) -> anyhow::Result<Value> {
        let bar = ProgressBar::new(100);
        bar.set_style(ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos:>3}% {msg}",
        )?);
        let record = match follow_stream(&self.http, &self.base, &self.key, id, &bar).await {
            Some(r) => r,
            None => poll(&self.http, &self.base, &self.key, id, &bar).await?,
        };
        bar.finish_with_message(record["state"].as_str().unwrap_or("?").to_string());
        Ok(record)
    }

    /// Downloads a successful task's images into `out`; their paths.
    pub async fn download(
        &self,
        id: &str,
        record: &Value,
        out: &Path,
    ) -> anyhow::Result<Vec<PathBuf>> {
        let result: Value = serde_json::from_str(record["resultJson"].as_str().unwrap_or("{}"))?;
        std::fs::create_dir_all(out)?;
        let mut paths = Vec::new();
        for (i, url) in result["resultUrls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let url = url.as_str().context("result URL")?;
            let resp = self.http.get(url).send().await?.error_for_status()?;
            let ext = match resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
            {
                Some("image/jpeg") => "jpg",
                Some("image/webp") => "webp",
                _ => "png",
            };
            let bytes = resp.bytes().await?;
            let path = out.join(format!("{id}-{i}.{ext}"));
            std::fs::write(&path, &bytes)?;
            paths.push(path);
        }
        Ok(paths)
    }
}
