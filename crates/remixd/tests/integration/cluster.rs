//! Beyond one machine, on one: two API processes and two worker processes of the real
//! binary on one PostgreSQL database (a fresh schema of the suite's throwaway cluster)
//! and one bucket (an S3-protocol server on loopback). A burst spread over both API nodes all ends; a worker killed
//! mid-task has its tasks taken over after the lease, none lost and none charged twice;
//! a task's SSE stream on one API node follows the work of a worker elsewhere; result
//! files are served by either API node; the 429 limits hold across both API nodes.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use remixd_domain::TaskState;
use remixd_store::{PostgresStore, Store};
use remixd_testkit::s3::S3Server;
use remixd_testkit::{Api, ImageServer};
use serde_json::{json, Value};

/// The `[storage]` lines of files in a directory every node shares.
fn shared_dir(files: &Path) -> String {
    format!("url = \"file://{}\"", files.display())
}

/// The `[storage]` lines of files in the bucket of `s3`.
fn bucket(s3: &S3Server) -> String {
    format!(
        "url = \"{}\"\n[storage.s3]\nendpoint = \"{}\"\npath_style = true\naccess_key = \"{}\"\nsecret = \"{}\"",
        s3.url("files"),
        s3.endpoint,
        s3.access_key,
        s3.secret
    )
}

/// One node's configuration: its own data dir and port, the shared database and
/// `storage` (the `[storage]` table's lines).
fn write_config(
    dir: &Path,
    port: u16,
    db: &str,
    storage: &str,
    public_url: &str,
    poll_ms: u64,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = format!(
        r#"data_dir = "{dir}"
[server]
listen = "127.0.0.1:{port}"
public_url = "{public_url}"
[database]
url = "{db}"
max_connections = 8
[fetch]
allow = ["127.0.0.1/32"]
[limits]
create_per_10s = 10000
query_per_s = 20
max_attempts = 5
[engine.preview]
delay_ms = 400
[worker]
lease_ms = 1500
poll_ms = {poll_ms}
shutdown_grace_ms = 3000
[storage]
min_free_mb = 0
{storage}
"#,
        dir = dir.display(),
    );
    let path = dir.join("remixd.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

struct Node {
    child: Child,
    base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(config: &Path, role: &str, port: u16) -> Node {
    let child = Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args(["serve", "--role", role, "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start remixd");
    let base = format!("http://127.0.0.1:{port}");
    Api::new(&base, "")
        .wait_ready(Duration::from_secs(30))
        .await;
    Node { child, base }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_api_nodes_and_two_workers_share_one_database() {
    let db = remixd_testkit::postgres::fresh_schema("cluster").await;
    let root = tempfile::tempdir().unwrap();
    let s3 = S3Server::start("remixd").await;
    let storage = bucket(&s3);
    let img = ImageServer::start().await;
    let ports: Vec<u16> = (0..4).map(|_| common::free_port()).collect();
    let public = format!("http://127.0.0.1:{}", ports[0]);
    let cfg: Vec<PathBuf> = ["api1", "api2", "w1", "w2"]
        .iter()
        .zip(&ports)
        .map(|(name, port)| {
            write_config(&root.path().join(name), *port, &db, &storage, &public, 1000)
        })
        .collect();

    // The first API node makes the default account; the operator adds credits from the
    // CLI against the same database.
    let api1 = start(&cfg[0], "api", ports[0]).await;
    let key = std::fs::read_to_string(root.path().join("api1/default.key"))
        .expect("the first node made the default key")
        .trim()
        .to_string();
    assert_eq!(common::add_default_credits(&cfg[1], 99000), 100000);
    let api2 = start(&cfg[1], "api", ports[1]).await;
    assert!(
        !root.path().join("api2/default.key").exists(),
        "a second node on the same database makes no second account"
    );
    let (a1, a2) = (Api::new(&api1.base, &key), Api::new(&api2.base, &key));
    let w1 = start(&cfg[2], "worker", ports[2]).await;

    // A burst spread over both API nodes, one worker running it.
    let body = img.sample_task(json!({"num_images": 1, "rendering_speed": "TURBO"}));
    let mut ids = Vec::new();
    for i in 0..16 {
        let api = if i % 2 == 0 { &a1 } else { &a2 };
        ids.push(api.create_ok(&body).await);
    }
    // Wait until w1 is generating, then start w2 and kill w1 mid-task.
    let store = PostgresStore::open(&db, 2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let leased_by_w1 = loop {
        let mut generating = Vec::new();
        for id in &ids {
            let t = store.task(&id.parse().unwrap()).await.unwrap().unwrap();
            if t.state == TaskState::Generating {
                generating.push(t.id);
            }
        }
        if !generating.is_empty() {
            break generating;
        }
        assert!(Instant::now() < deadline, "w1 never started generating");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut w1 = w1;
    common::signal(&w1.child, "-KILL");
    w1.child.wait().unwrap();
    let _w2 = start(&cfg[3], "worker", ports[3]).await;

    // The stream on API node 2 of a task created on node 1 follows it to its end while
    // the worker on another process runs it.
    let followed = a1.create_ok(&body).await;
    let resp = a2
        .http
        .get(format!("{}/api/v1/jobs/stream?taskId={followed}", a2.base))
        .bearer_auth(&a2.key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(60), resp.text())
        .await
        .expect("the stream ends")
        .unwrap();
    let last = text
        .split("\n\n")
        .filter(|e| e.contains("event: task"))
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .last()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .expect("task events");
    assert_eq!(last["state"], "success", "{text}");
    ids.push(followed);

    // Every task ends; the ones w1 held were taken over after its lease and succeeded.
    let done = common::wait_all_done(&a2, &ids, Duration::from_secs(120)).await;
    assert!(
        done.iter().all(|d| d["state"] == "success"),
        "{:?}",
        done.iter()
            .map(|d| (d["state"].clone(), d["failMsg"].clone()))
            .collect::<Vec<_>>()
    );
    for id in &leased_by_w1 {
        let t = store.task(id).await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Success);
        assert!(
            t.attempts >= 2,
            "task {id} was taken over: {} attempts",
            t.attempts
        );
    }
    // Balances exact from the database: 12 credits per TURBO image, charged once.
    let acct = store.account_by_name("default").await.unwrap().unwrap();
    let consumed = store.credits_in_tasks(&acct.id).await.unwrap();
    assert_eq!(consumed, 12 * ids.len() as i64, "each task charged once");
    assert_eq!(acct.credits + consumed, 100_000, "no credit lost or made");
    // Result files written by a worker into the bucket are served by either API node.
    let r: Value = serde_json::from_str(done[0]["resultJson"].as_str().unwrap()).unwrap();
    let url = r["resultUrls"][0].as_str().unwrap();
    let path = url.strip_prefix(&public).unwrap();
    let key = path.strip_prefix("/files/").unwrap();
    let object = std::fs::read(s3.root.join("remixd/files").join(key)).expect("in the bucket");
    for base in [&api1.base, &api2.base] {
        let resp = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(resp.status(), 200, "{base}{path}");
        assert_eq!(resp.bytes().await.unwrap(), object);
    }

    // The query limit (20 per key per second) holds across both nodes: 40 queries in a
    // burst over the two, of which about 20 pass (plus what refills meanwhile), not 40.
    // First let the key's counter refill from the polling above (20 per second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probe = ids[0].clone();
    let answers = futures::future::join_all((0..40).map(|i| {
        let api = if i % 2 == 0 { a1.clone() } else { a2.clone() };
        let probe = probe.clone();
        async move { api.record(&probe).await.code() }
    }))
    .await;
    let passed = answers.iter().filter(|c| **c == 200).count();
    let limited = answers.iter().filter(|c| **c == 429).count();
    assert_eq!(passed + limited, 40, "{answers:?}");
    assert!(
        (20..=26).contains(&passed),
        "{passed} of 40 passed: the nodes do not share the limit"
    );
}

/// A task created on an API node wakes a worker in another process at once, through the
/// database's notifications: with polling once a minute, the task still ends in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_on_one_node_wakes_a_worker_on_another() {
    let db = remixd_testkit::postgres::fresh_schema("wake").await;
    let root = tempfile::tempdir().unwrap();
    let files = root.path().join("files");
    let img = ImageServer::start().await;
    let ports = [common::free_port(), common::free_port()];
    let public = format!("http://127.0.0.1:{}", ports[0]);
    let api_cfg = write_config(
        &root.path().join("api"),
        ports[0],
        &db,
        &shared_dir(&files),
        &public,
        60_000,
    );
    let w_cfg = write_config(
        &root.path().join("w"),
        ports[1],
        &db,
        &shared_dir(&files),
        &public,
        60_000,
    );
    let api = start(&api_cfg, "api", ports[0]).await;
    let key = std::fs::read_to_string(root.path().join("api/default.key"))
        .unwrap()
        .trim()
        .to_string();
    let _worker = start(&w_cfg, "worker", ports[1]).await;
    // Past the worker's first look at the queue, so only a wake-up can bring it back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = Api::new(&api.base, &key);
    let t0 = Instant::now();
    let id = a
        .create_ok(&img.sample_task(json!({"rendering_speed": "TURBO"})))
        .await;
    let done = a.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "success");
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}: the worker waited for its poll, not the notification",
        t0.elapsed()
    );
}
