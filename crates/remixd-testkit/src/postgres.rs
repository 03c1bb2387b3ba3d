//! A fresh, empty PostgreSQL schema per test, on the throwaway cluster that
//! scripts/test.sh starts (scripts/postgres.sh) and names in `REMIXD_TEST_POSTGRES_URL`.
//!
//! Each call makes a schema with a unique name and returns the cluster's URL with
//! `search_path` set to it, so tests that run at once never see each other's tables, and
//! the URL works for a child process too (`database.url`).

use std::sync::atomic::{AtomicUsize, Ordering};

/// The variable scripts/postgres.sh exports.
pub const URL_VAR: &str = "REMIXD_TEST_POSTGRES_URL";

/// The cluster's URL. Panics with what to do when the tests run without one: the
/// PostgreSQL tests are part of the suite and must not pass by being skipped.
pub fn cluster_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{URL_VAR} is not set: these tests need a PostgreSQL server. scripts/test.sh \
             installs and starts a throwaway one; run the suite through it, or point {URL_VAR} \
             at a server you may create schemas on (postgres://user@127.0.0.1:PORT/db)"
        )
    })
}

/// Makes a new empty schema and returns a URL whose connections use it.
pub async fn fresh_schema(label: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let base = cluster_url();
    let schema = format!(
        "t_{}_{}_{}_{}",
        label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(24)
            .collect::<String>()
            .to_ascii_lowercase(),
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let pool = sqlx::PgPool::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("connecting to {base}: {e}"));
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("creating schema {schema}: {e}"));
    pool.close().await;
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}
