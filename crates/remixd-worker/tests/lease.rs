//! A worker holds its task's lease until the task is finished, not only while the engine
//! runs: storing the results can outlast a lease (a slow disk or bucket), and a lease
//! that lapsed meanwhile would hand the task to another attempt while this one writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::memory::InMemory;
use object_store::throttle::{ThrottleConfig, ThrottledStore};
use remixd_domain::TaskState;
use remixd_engine::PreviewEngine;
use remixd_fetch::{FetchConfig, Fetcher};
use remixd_store::contract::{account_with_key, new_task};
use remixd_store::{Blobs, SqliteStore, Store};
use remixd_testkit::ImageServer;
use remixd_worker::{Wakeup, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_outlasts_a_slow_result_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("w.db").display());
    let store = Arc::new(SqliteStore::open(&url).await.unwrap());
    store.migrate().await.unwrap();
    let (acct, key) = account_with_key(&*store, "a", 1000, Default::default()).await;
    let img = ImageServer::start().await;
    let mut t = new_task(&acct, &key, 10, remixd_domain::now_millis());
    t.input.image_url = img.url("coffee.webp");
    t.input.reference_image_url = img.url("astronaut.webp");
    let id = t.id;
    store.create_task(t).await.unwrap();

    // Every write to storage takes 1.5 s: three times the lease below. (In memory: the
    // throttle cannot wrap the local filesystem's file reads.)
    let slow = ThrottledStore::new(
        InMemory::new(),
        ThrottleConfig {
            wait_put_per_call: Duration::from_millis(1500),
            ..ThrottleConfig::default()
        },
    );
    let blobs = Blobs::from_object_store(Arc::new(slow), "slow");
    let fetcher = Fetcher::new(FetchConfig {
        allow: vec!["127.0.0.1/32".into()],
        ..FetchConfig::default()
    })
    .unwrap();
    let cfg = WorkerConfig {
        lease: Duration::from_millis(500),
        poll_interval: Duration::from_millis(50),
        retry_delay: Duration::from_millis(50),
        ..WorkerConfig::default()
    };
    let tracker = TaskTracker::new();
    let shutdown = CancellationToken::new();
    Worker::new(
        store.clone(),
        blobs,
        fetcher,
        Arc::new(PreviewEngine::default()),
        cfg,
        Wakeup::default(),
    )
    .spawn(&tracker, shutdown.clone());

    let deadline = Instant::now() + Duration::from_secs(60);
    let task = loop {
        let t = store.task(&id).await.unwrap().unwrap();
        if t.state.is_terminal() {
            break t;
        }
        assert!(Instant::now() < deadline, "task still {:?}", t.state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    assert_eq!(task.state, TaskState::Success, "{}", task.fail_msg);
    assert_eq!(task.attempts, 1, "the first attempt finished the task");
    assert_eq!(task.fetch_attempts, 1, "the inputs were fetched once");
}
