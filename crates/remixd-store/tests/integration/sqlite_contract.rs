//! The store contract, run against SQLite files in a temporary directory.

use std::sync::Arc;

use remixd_store::{contract, SqliteStore, Store};

#[tokio::test]
async fn sqlite_passes_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    contract::run_all(|| {
        let path = dir.path().join(format!(
            "db{}.sqlite",
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        async move {
            let s = SqliteStore::open(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            s.migrate().await.unwrap();
            Arc::new(s) as Arc<dyn Store>
        }
    })
    .await;
}
