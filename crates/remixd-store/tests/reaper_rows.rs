//! The reaper is not held up by a row it cannot handle: a task row with a corrupt id
//! (written behind remixd's back) is reported and left alone, and the other expired
//! tasks still go back to their queue in the same pass.

use remixd_store::contract::{account_with_key, new_task};
use remixd_store::{SqliteStore, Stage, Store};

#[tokio::test]
async fn one_bad_row_does_not_abort_the_reaper_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let url = format!("sqlite://{}", path.display());
    let s = SqliteStore::open(&url).await.unwrap();
    s.migrate().await.unwrap();
    let (acct, key) = account_with_key(&s, "a", 100, Default::default()).await;
    let t = new_task(&acct, &key, 10, 1);
    s.create_task(t.clone()).await.unwrap();
    let claimed = s.claim(Stage::Fetch, "w", 10, 20).await.unwrap().unwrap();
    assert_eq!(claimed.id, t.id);

    // A second expired task whose id is not a task id.
    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO tasks (id, account_id, key_id, model, state, param, input, cost, credits_consumed, \
         lease_owner, lease_until, create_time, update_time) \
         SELECT 'not-a-task-id', account_id, key_id, model, 'waiting', param, input, cost, credits_consumed, \
         'w', 20, create_time, update_time FROM tasks WHERE id = ?",
    )
    .bind(t.id.to_string())
    .execute(&raw)
    .await
    .unwrap();

    let r = s.reap(1_000, 3).await.expect("the pass completes");
    assert_eq!(r.requeued, vec![t.id], "the good task is requeued");
    assert_eq!(r.skipped.len(), 1, "{r:?}");
    assert_eq!(r.skipped[0].0, "not-a-task-id");
    // The good task can be claimed again at once.
    assert!(s
        .claim(Stage::Fetch, "w2", 1_001, 2_000)
        .await
        .unwrap()
        .is_some());
}
