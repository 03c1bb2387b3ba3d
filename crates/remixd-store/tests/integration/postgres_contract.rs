//! The store contract, run against PostgreSQL: each check on a fresh schema of the
//! suite's throwaway cluster (scripts/postgres.sh), plus what only a store shared by
//! several processes has: signals between nodes.

use std::sync::Arc;
use std::time::Duration;

use remixd_store::contract::{self, reaper_skips_a_corrupt_row, CORRUPT_ROW_SQL};
use remixd_store::{PostgresStore, Signal, Store};

async fn store(label: &str) -> (PostgresStore, String) {
    let url = remixd_testkit::postgres::fresh_schema(label).await;
    let s = PostgresStore::open(&url, 8).await.unwrap();
    s.migrate().await.unwrap();
    (s, url)
}

#[tokio::test]
async fn postgres_passes_the_store_contract() {
    contract::run_all(|| async { Arc::new(store("contract").await.0) as Arc<dyn Store> }).await;
}

#[tokio::test]
async fn one_bad_row_does_not_abort_the_reaper_pass() {
    let (s, url) = store("reaper").await;
    reaper_skips_a_corrupt_row(&s, |id| async move {
        let raw = sqlx::PgPool::connect(&url).await.unwrap();
        sqlx::query(CORRUPT_ROW_SQL)
            .bind(id)
            .execute(&raw)
            .await
            .unwrap();
    })
    .await;
}

/// What one node publishes, every node's subscription receives, in order; text that is
/// not a signal is ignored.
#[tokio::test]
async fn signals_reach_every_node() {
    let (a, url) = store("signals").await;
    // A second node: its own pool on the same database.
    let b = PostgresStore::open(&url, 2).await.unwrap();
    let mut on_a = a
        .subscribe()
        .await
        .unwrap()
        .expect("PostgreSQL has a channel");
    let mut on_b = b
        .subscribe()
        .await
        .unwrap()
        .expect("PostgreSQL has a channel");
    let id = remixd_domain::TaskId::new();
    sqlx::query("SELECT pg_notify('remixd', 'not a signal')")
        .execute(a.pool())
        .await
        .unwrap();
    let sent = [
        Signal::Created,
        Signal::InputsReady,
        Signal::Finished,
        Signal::Cancelled(id),
    ];
    for s in sent {
        b.publish(s).await.unwrap();
    }
    for rx in [&mut on_a, &mut on_b] {
        for want in sent {
            let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a signal within 10 s")
                .expect("the channel is open");
            assert_eq!(got, want);
        }
    }
}

/// The shared GCRA counter: a burst passes, the next request waits about one interval,
/// other keys are independent; requests racing from many connections (as from several
/// API nodes) pass exactly as many as the burst.
#[tokio::test]
async fn shared_rate_limits_count_across_connections() {
    use remixd_store::RateDecision;
    let (s, url) = store("rates").await;
    // 5 requests per 10 s: one every 2 s, all 5 at once.
    let (interval, burst) = (2_000_000, 5);
    for _ in 0..5 {
        assert_eq!(
            s.rate_check("create a", interval, burst).await.unwrap(),
            Some(RateDecision::Allowed)
        );
    }
    match s.rate_check("create a", interval, burst).await.unwrap() {
        Some(RateDecision::Wait { us }) => assert!((1..=interval).contains(&us), "{us}"),
        other => panic!("the 6th request passed: {other:?}"),
    }
    assert_eq!(
        s.rate_check("create b", interval, burst).await.unwrap(),
        Some(RateDecision::Allowed),
        "another key has its own counter"
    );

    // Racing: 4 stores (4 pools, like 4 nodes), 40 requests on one key, burst 7.
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(Arc::new(PostgresStore::open(&url, 4).await.unwrap()));
    }
    let joins: Vec<_> = (0..40)
        .map(|i| {
            let n = nodes[i % 4].clone();
            tokio::spawn(async move { n.rate_check("query k", 60_000_000, 7).await.unwrap() })
        })
        .collect();
    let mut passed = 0;
    for j in joins {
        passed += (j.await.unwrap() == Some(RateDecision::Allowed)) as usize;
    }
    assert_eq!(passed, 7);
    // Counters whose time is still ahead are kept by the pruning.
    assert_eq!(s.prune_rates().await.unwrap(), 0);
}
