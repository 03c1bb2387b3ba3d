//! `remixd submit`, the real binary, against a real server: local files are uploaded,
//! the task is followed (SSE, or polling when the stream is off), images downloaded.

use crate::common;

use std::path::Path;

use common::TestServer;

async fn submit(srv: &TestServer, out: &Path, extra: &[&str]) -> std::process::Output {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets");
    let mut args: Vec<String> = vec![
        "submit".into(),
        "--image".into(),
        assets.join("coffee.webp").display().to_string(),
        "--character".into(),
        assets.join("astronaut.webp").display().to_string(),
        "--mask".into(),
        assets.join("astronaut_mask.png").display().to_string(),
        "--prompt".into(),
        "an astronaut with coffee".into(),
        "--size".into(),
        "square".into(),
        "--num".into(),
        "2".into(),
        "--server".into(),
        srv.api.base.clone(),
        "--key".into(),
        srv.api.key.clone(),
        "--out".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let bin = env!("CARGO_BIN_EXE_remixd");
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(&args)
            .env_remove("REMIXD_KEY")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn check_images(out: &Path, stdout: &[u8]) {
    let printed: Vec<String> = String::from_utf8_lossy(stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(printed.len(), 2, "{printed:?}");
    for p in printed {
        let img = image::open(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert_eq!((img.width(), img.height()), (512, 512));
        assert!(Path::new(&p).starts_with(out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_uploads_follows_the_stream_and_downloads() {
    // recordInfo is off: success proves the stream carried the task to its end.
    let srv = TestServer::start_with(|s| {
        s.engine.preview.delay_ms = 200;
        s.api.disabled = vec!["recordInfo".into()];
    })
    .await;
    let out = tempfile::tempdir().unwrap();
    let o = submit(
        &srv,
        out.path(),
        &["--seed", "5", "--style-type", "FICTION"],
    )
    .await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_images(out.path(), &o.stdout);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_falls_back_to_polling_without_a_stream() {
    let srv = TestServer::start_with(|s| s.api.disabled = vec!["stream".into()]).await;
    let out = tempfile::tempdir().unwrap();
    let o = submit(&srv, out.path(), &[]).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_images(out.path(), &o.stdout);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_reports_a_refusal_in_one_line() {
    let srv = TestServer::start().await;
    let out = tempfile::tempdir().unwrap();
    let o = submit(&srv, out.path(), &["--strength", "7"]).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("input.strength must be between 0.1 and 1"),
        "{err}"
    );
    srv.stop().await;
}
