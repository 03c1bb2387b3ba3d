//! Starts the real remixd in-process on 127.0.0.1:0 with a temporary data directory.

use std::sync::Arc;
use std::time::Duration;

use remixd::settings::Settings;
use remixd::Role;
use remixd_domain::{now_millis, KeyLimits};
use remixd_store::Store;
use remixd_testkit::Api;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub api: Api,
    pub settings: Settings,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Settings for tests: loopback allowed, fast leases and polling, generous limits.
pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.to_path_buf(),
        ..Settings::default()
    };
    s.fetch.allow = vec!["127.0.0.1/32".into()];
    s.fetch.timeout_s = 5;
    s.limits.create_per_10s = 1000;
    s.limits.query_per_s = 1000;
    s.limits.uploads_per_10s = 1000;
    s.worker.poll_ms = 50;
    s.worker.lease_ms = 2000;
    s.worker.retry_delay_ms = 100;
    s.worker.shutdown_grace_ms = 2000;
    // The free-space guard has its own tests on a small filesystem; elsewhere the
    // machine's free space must not decide whether a test passes.
    s.storage.min_free_mb = 0;
    s
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = test_settings(dir.path());
        tweak(&mut settings);
        Self::launch(dir, settings).await
    }

    /// Stops this server and starts another on the same data directory and settings.
    pub async fn restart(self) -> Self {
        let (dir, settings) = (self.dir, self.settings.clone());
        self.shutdown.cancel();
        self.handle.await.expect("join").expect("server result");
        Self::launch(dir, settings).await
    }

    async fn launch(dir: tempfile::TempDir, settings: Settings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(remixd::launch_with_listener(
            settings.clone(),
            listener,
            Role::All,
            shutdown.clone(),
        ));
        let api = Api::new(&base, "");
        api.wait_ready(Duration::from_secs(20)).await;
        // A server started on a database that has accounts already writes no key.
        let key = std::fs::read_to_string(settings.data_dir.join("default.key"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Self {
            api: api.with_key(&key),
            settings,
            dir,
            shutdown,
            handle,
        }
    }

    /// A second connection to the same database, as an operator's CLI would open it.
    pub async fn store(&self) -> Arc<dyn Store> {
        remixd::open_store(&self.settings)
            .await
            .expect("open store")
    }

    /// Creates an account with one key; returns a client using that key.
    pub async fn account(&self, name: &str, credits: i64, limits: KeyLimits) -> Api {
        let store = self.store().await;
        store
            .create_account(&remixd::uuid_like(), name, credits, now_millis())
            .await
            .unwrap();
        let (token, rec) = remixd_api::auth::generate_key(name, "test", limits);
        store.create_key(rec, now_millis()).await.unwrap();
        self.api.with_key(&token.0)
    }

    pub async fn stop(self) {
        self.stop_keeping_dir().await;
    }

    /// Stops this server and hands over its data directory, which lives on.
    pub async fn stop_keeping_dir(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.handle.await.expect("join").expect("server result");
        self.dir
    }
}

/// The default account's client of a remixd process started elsewhere (the real binary,
/// for kill and limit tests) on `base` with `data_dir`: waits until `/readyz` answers,
/// then reads the key the first start wrote.
pub async fn ready_client(base: &str, data_dir: &std::path::Path) -> Api {
    Api::new(base, "").wait_ready(Duration::from_secs(30)).await;
    let key = std::fs::read_to_string(data_dir.join("default.key"))
        .expect("default.key")
        .trim()
        .to_string();
    Api::new(base, &key)
}

/// Keeps the files of `s` under `prefix` in the bucket of `s3` (path-style, its keys).
pub fn use_bucket(s: &mut Settings, s3: &remixd_testkit::s3::S3Server, prefix: &str) {
    s.storage.url = Some(s3.url(prefix));
    s.storage.s3.endpoint = Some(s3.endpoint.clone());
    s.storage.s3.path_style = true;
    s.storage.s3.access_key = Some(remixd::settings::Secret(s3.access_key.clone()));
    s.storage.s3.secret = Some(remixd::settings::Secret(s3.secret.clone()));
}

/// A loopback port free at the time of asking (for a process started with it).
/// Adds `credits` to the default account with the operator's CLI (the real binary, on
/// the database of `config`, whether or not a server runs on it); returns the balance
/// it prints.
pub fn add_default_credits(config: &std::path::Path, credits: i64) -> i64 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_remixd"))
        .args([
            "credits",
            "add",
            "--account",
            "default",
            &credits.to_string(),
            "--config",
        ])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `sig` (`-TERM`, `-KILL`, …) to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// The recordInfo objects of `ids`; every one must exist (an accepted task is never lost).
pub async fn records(api: &Api, ids: &[String]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for id in ids {
        let a = api.record(id).await;
        assert_eq!(a.code(), 200, "accepted task {id} must exist: {:?}", a.body);
        out.push(a.body["data"].clone());
    }
    out
}

/// Waits until every task of `ids` is `success` or `fail`; their records.
pub async fn wait_all_done(api: &Api, ids: &[String], within: Duration) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let all = records(api, ids).await;
        if all
            .iter()
            .all(|d| d["state"] == "success" || d["state"] == "fail")
        {
            return all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tasks stuck: {:?}",
            all.iter().map(|d| d["state"].clone()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
