//! The reaper is not held up by a row it cannot handle (on SQLite; the PostgreSQL run is
//! in postgres_contract.rs).

use remixd_store::contract::{reaper_skips_a_corrupt_row, CORRUPT_ROW_SQL};
use remixd_store::{SqliteStore, Store};

#[tokio::test]
async fn one_bad_row_does_not_abort_the_reaper_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let url = format!("sqlite://{}", path.display());
    let s = SqliteStore::open(&url).await.unwrap();
    s.migrate().await.unwrap();
    reaper_skips_a_corrupt_row(&s, |id| async move {
        let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(CORRUPT_ROW_SQL)
            .bind(id)
            .execute(&raw)
            .await
            .unwrap();
    })
    .await;
}
