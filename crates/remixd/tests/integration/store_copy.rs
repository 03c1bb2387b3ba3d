//! Moving from one machine to many: a server's SQLite database and files copied by
//! `remixd store copy` (the real binary) into PostgreSQL and a bucket; a server started
//! on the copies answers for the same tasks, balances, keys and files; the copy refuses a
//! target that holds data; and a copy back into SQLite reads the same checksums.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::TestServer;
use remixd_testkit::s3::S3Server;
use remixd_testkit::ImageServer;
use serde_json::{json, Value};

/// Runs `remixd store copy` with the bucket's settings in the environment; (success,
/// stdout, stderr).
fn copy(args: &[&str], s3: &S3Server, cwd: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["store", "copy"])
        .args(args)
        .current_dir(cwd)
        .env("REMIXD__STORAGE__S3__ENDPOINT", &s3.endpoint)
        .env("REMIXD__STORAGE__S3__PATH_STYLE", "true")
        .env("REMIXD__STORAGE__S3__ACCESS_KEY", &s3.access_key)
        .env("REMIXD__STORAGE__S3__SECRET", &s3.secret)
        .output()
        .expect("run remixd");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The table lines of a copy's report, `table rows sha256`.
fn checksums(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.contains("sha256") && !l.starts_with("files"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_node_moves_to_postgres_and_a_bucket_and_back() {
    // A server on the embedded defaults with some history: successes, a failure, a
    // callback delivery, an idempotency key, an upload.
    let img = ImageServer::start().await;
    let hook = remixd_testkit::Receiver::start().await;
    let srv = TestServer::start_with(|s| s.engine.preview.delay_ms = 0).await;
    let upload_url = srv
        .api
        .upload_ok(&remixd_testkit::samples::png(64, 64, [9, 9, 9]), "u.png")
        .await;
    let mut body = img.sample_task(json!({"num_images": 2}));
    body["callBackUrl"] = json!(format!("{}/ok", hook.base));
    let ok_id = srv.api.create_ok(&body).await;
    let bad = img.sample_task(json!({"image_url": img.url("/missing.png")}));
    let bad_id = srv.api.create_ok(&bad).await;
    let resp = srv
        .api
        .http
        .post(format!("{}/api/v1/jobs/createTask", srv.api.base))
        .bearer_auth(&srv.api.key)
        .header("Idempotency-Key", "move-1")
        .json(&img.sample_task(json!({})))
        .send()
        .await
        .unwrap();
    let idem_id = resp.json::<Value>().await.unwrap()["data"]["taskId"]
        .as_str()
        .unwrap()
        .to_string();
    let ok_done = srv.api.wait_done(&ok_id, Duration::from_secs(30)).await;
    assert_eq!(ok_done["state"], "success");
    assert_eq!(
        srv.api.wait_done(&bad_id, Duration::from_secs(30)).await["state"],
        "fail"
    );
    srv.api.wait_done(&idem_id, Duration::from_secs(30)).await;
    hook.wait_for(1, Duration::from_secs(30)).await;
    let balance = srv.api.balance().await;
    let (key, settings) = (srv.api.key.clone(), srv.settings.clone());
    let dir = srv.stop_keeping_dir().await;
    let data = dir.path().to_path_buf();

    // Copy both into PostgreSQL and a bucket.
    let s3 = S3Server::start("remixd").await;
    let pg = remixd_testkit::postgres::fresh_schema("copy").await;
    let sqlite = settings.database_url();
    let files = settings.storage_url();
    let bucket = s3.url("moved");
    let (ok, out, err) = copy(
        &[
            "--from",
            &sqlite,
            "--to",
            &pg,
            "--files-from",
            &files,
            "--files-to",
            &bucket,
        ],
        &s3,
        &data,
    );
    assert!(ok, "{err}");
    let sums = checksums(&out);
    assert_eq!(sums.len(), 7, "{out}");
    assert!(sums.iter().any(|l| l.starts_with("tasks 3 ")), "{out}");
    assert!(sums.iter().any(|l| l.starts_with("deliveries 1 ")), "{out}");
    assert!(out.contains("files copied and verified"), "{out}");

    // Again into the same target: refused, nothing written.
    let (ok, _, err) = copy(&["--from", &sqlite, "--to", &pg], &s3, &data);
    assert!(!ok);
    assert!(err.contains("not empty"), "{err}");
    let (ok, _, err) = copy(
        &[
            "--from",
            &sqlite,
            "--to",
            &format!("sqlite://{}/other.db", data.display()),
            "--files-from",
            &files,
            "--files-to",
            &bucket,
        ],
        &s3,
        &data,
    );
    assert!(!ok && err.contains("not empty"), "{err}");
    // A source that does not exist is an error, not an empty copy.
    let (ok, _, err) = copy(
        &[
            "--from",
            &format!("sqlite://{}/typo.db", data.display()),
            "--to",
            &pg,
        ],
        &s3,
        &data,
    );
    assert!(!ok && err.contains("not found"), "{err}");

    // A server on the copies: same key, balance, tasks and files.
    let moved = TestServer::start_with(|s| {
        s.database.url = Some(pg.clone());
        common::use_bucket(s, &s3, "moved");
    })
    .await;
    let api = moved.api.with_key(&key);
    assert_eq!(api.balance().await, balance);
    let rec = api.record(&ok_id).await;
    assert_eq!(rec.body["data"]["state"], "success");
    assert_eq!(rec.body["data"]["resultJson"], ok_done["resultJson"]);
    let urls: Value = serde_json::from_str(ok_done["resultJson"].as_str().unwrap()).unwrap();
    for u in urls["resultUrls"].as_array().unwrap() {
        // The URL names the old server; the same path on the new one serves the file.
        let path = &u.as_str().unwrap()[u.as_str().unwrap().find("/files/").unwrap()..];
        let got = reqwest::get(format!("{}{path}", api.base)).await.unwrap();
        assert_eq!(got.status(), 200, "{path}");
    }
    let path = &upload_url[upload_url.find("/files/").unwrap()..];
    assert_eq!(
        reqwest::get(format!("{}{path}", api.base))
            .await
            .unwrap()
            .status(),
        200
    );
    // The idempotency key still answers with its task.
    let again = api
        .http
        .post(format!("{}/api/v1/jobs/createTask", api.base))
        .bearer_auth(&key)
        .header("Idempotency-Key", "move-1")
        .json(&img.sample_task(json!({})))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(again["data"]["taskId"], idem_id.as_str());
    assert_eq!(api.balance().await, balance, "no second charge");
    moved.stop().await;

    // And back into SQLite: the same checksums table for table.
    let back = format!("sqlite://{}/back.db", data.display());
    let (ok, out_back, err) = copy(&["--from", &pg, "--to", &back], &s3, &data);
    assert!(ok, "{err}");
    // (The server on the copies changed no row: an idempotent retry writes nothing.)
    assert_eq!(checksums(&out_back), sums);
}
