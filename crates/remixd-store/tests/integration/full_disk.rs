//! The SQLite store on a real filesystem that runs out of space: a write that fails for
//! lack of space is an error of its own kind (`StoreError::Full`, `BlobError::is_full`), the writer
//! connection is never left inside a dead transaction, and once space is back every
//! write works again without a restart.

use remixd_store::contract::{account_with_key, new_task};
use remixd_store::{CreateOutcome, SqliteStore, Store, StoreError};
use remixd_testkit::tmpfs::Tmpfs;

#[tokio::test]
async fn a_full_disk_fails_writes_cleanly_and_the_writer_recovers() {
    let fs = Tmpfs::mount(4 << 20);
    let url = format!("sqlite://{}", fs.path().join("remixd.db").display());
    let s = SqliteStore::open(&url).await.unwrap();
    s.migrate().await.unwrap();
    let (acct, key) = account_with_key(&s, "a", 1_000_000, Default::default()).await;

    fs.fill();
    // Write until the database needs a page it cannot get. Each task carries a large
    // `param` so the WAL must grow quickly.
    let mut full = None;
    let mut accepted = 0;
    for i in 0..2_000 {
        let mut t = new_task(&acct, &key, 1, 1_000 + i);
        t.param = "x".repeat(32 * 1024);
        match s.create_task(t).await {
            Ok(CreateOutcome::Created { .. }) => accepted += 1,
            Ok(other) => panic!("unexpected outcome {other:?}"),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("a full disk must fail a write");
    assert!(matches!(err, StoreError::Full(_)), "{err:?}");

    // Still full: every further write fails the same clean way, never with a wedged
    // transaction ("non-zero transaction depth").
    for i in 0..3 {
        let mut t = new_task(&acct, &key, 1, 9_000 + i);
        t.param = "x".repeat(32 * 1024);
        match s.create_task(t).await {
            Err(StoreError::Full(_)) | Ok(_) => {}
            Err(e) => panic!("a write on a full disk must fail as Full, got {e:?}"),
        }
    }

    // The file storage on the same filesystem says so too.
    let blobs = remixd_store::Blobs::open(&format!("file://{}", fs.path().join("files").display()))
        .unwrap();
    let e = blobs
        .put("results/t/0.png", bytes::Bytes::from(vec![1u8; 64 * 1024]))
        .await
        .unwrap_err();
    assert!(e.is_full(), "{e:?}");

    fs.free();
    // The same store, no restart: writes work again and nothing accepted was lost.
    let t = new_task(&acct, &key, 1, 20_000);
    let out = s
        .create_task(t)
        .await
        .expect("writes work once space is back");
    assert!(matches!(out, CreateOutcome::Created { .. }), "{out:?}");
    s.add_credits("a", 5).await.expect("another kind of write");
    let in_tasks = s.credits_in_tasks(&acct).await.unwrap();
    let balance = s.balance(&acct).await.unwrap();
    assert!(in_tasks > accepted, "{in_tasks} <= {accepted}");
    assert_eq!(balance + in_tasks, 1_000_000 + 5, "credits exact");
}
