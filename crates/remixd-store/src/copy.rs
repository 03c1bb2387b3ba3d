//! Moving from one machine to many: `remixd store copy` copies every row of one
//! database into another (SQLite ⇄ PostgreSQL) and every file of one storage into
//! another (a directory ⇄ a bucket), then verifies counts and checksums.
//!
//! The copy is written by hand because what it moves is remixd's own schema: each
//! table's columns and their kinds are listed here ([`TABLES`]), rows are read in
//! primary-key order inside one read transaction (a consistent snapshot of the source)
//! and written inside one transaction on the target, so a failed copy leaves the target
//! as empty as it found it. The target must be empty: the copy never merges.
//!
//! The checksum of a table is SHA-256 over its rows in primary-key order, each value
//! written with its kind and length, so the same rows give the same digest whichever
//! database holds them.

use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::{BlobError, Blobs, PostgresStore, SqliteStore, Store, StoreError};

/// The kind of a column, as both databases store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Int,
    Bytes,
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Null,
    Text(String),
    Int(i64),
    Bytes(Vec<u8>),
}

/// A table to copy: its name, its primary key (the order rows are read and hashed in)
/// and its columns.
struct Table {
    name: &'static str,
    order_by: &'static [&'static str],
    columns: &'static [(&'static str, Kind)],
}

use Kind::{Bytes as B, Int as I, Text as T};

/// remixd's tables, parents before children (foreign keys). `rate_limits` is left out:
/// its counters are a few seconds' state that a new cluster starts without.
const TABLES: &[Table] = &[
    Table {
        name: "accounts",
        order_by: &["id"],
        columns: &[
            ("id", T),
            ("name", T),
            ("credits", I),
            ("webhook_secret", T),
            ("create_time", I),
        ],
    },
    Table {
        name: "api_keys",
        order_by: &["id"],
        columns: &[
            ("id", T),
            ("account_id", T),
            ("label", T),
            ("key_hash", B),
            ("hourly_limit", I),
            ("daily_limit", I),
            ("total_limit", I),
            ("create_time", I),
            ("revoke_time", I),
        ],
    },
    Table {
        name: "tasks",
        order_by: &["id"],
        columns: &[
            ("id", T),
            ("account_id", T),
            ("key_id", T),
            ("model", T),
            ("state", T),
            ("param", T),
            ("input", T),
            ("callback_url", T),
            ("result_json", T),
            ("fail_code", T),
            ("fail_msg", T),
            ("cost", I),
            ("credits_consumed", I),
            ("progress", I),
            ("fetch_attempts", I),
            ("attempts", I),
            ("lease_owner", T),
            ("lease_until", I),
            ("not_before", I),
            ("start_time", I),
            ("cost_time", I),
            ("create_time", I),
            ("update_time", I),
            ("complete_time", I),
            ("files_swept", I),
            ("upstream", T),
        ],
    },
    Table {
        name: "deliveries",
        order_by: &["id"],
        columns: &[
            ("id", T),
            ("task_id", T),
            ("account_id", T),
            ("url", T),
            ("remained_credits", I),
            ("payload", T),
            ("state", T),
            ("attempts", I),
            ("next_attempt", I),
            ("lease_owner", T),
            ("lease_until", I),
            ("last_status", I),
            ("last_error", T),
            ("create_time", I),
            ("update_time", I),
            ("complete_time", I),
        ],
    },
    Table {
        name: "idempotency_keys",
        order_by: &["account_id", "key"],
        columns: &[
            ("account_id", T),
            ("key", T),
            ("body_hash", T),
            ("task_id", T),
            ("create_time", I),
        ],
    },
    Table {
        name: "uploads",
        order_by: &["key"],
        columns: &[
            ("key", T),
            ("account_id", T),
            ("file_size", I),
            ("mime_type", T),
            ("create_time", I),
            ("expire_time", I),
        ],
    },
    Table {
        name: "server_values",
        order_by: &["name"],
        columns: &[("name", T), ("value", T)],
    },
];

/// Errors of a copy.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Files(#[from] BlobError),
    /// The target holds data already; nothing was written.
    #[error("the target {0} is not empty ({1}); remixd store copy writes only into an empty one")]
    NotEmpty(String, String),
    /// What was written does not read back the same.
    #[error("verification failed: {0}")]
    Mismatch(String),
}

impl From<sqlx::Error> for CopyError {
    fn from(e: sqlx::Error) -> Self {
        CopyError::Store(e.into())
    }
}

/// A database opened for copying.
pub enum Database {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Database {
    /// Opens the database to copy from, which must exist (a mistyped SQLite path would
    /// otherwise be created empty and copied as such), and brings its schema up to date
    /// as a start of remixd would.
    pub async fn open_source(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            if !std::path::Path::new(path).is_file() {
                return Err(StoreError::NotFound(format!("database file {path:?}")));
            }
        }
        Self::open(url).await
    }

    /// Opens (creating) a `sqlite://` or `postgres://` database and applies remixd's
    /// migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let db = if url.starts_with("sqlite:") {
            Database::Sqlite(SqliteStore::open(url).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Database::Postgres(PostgresStore::open(url, 4).await?)
        } else {
            return Err(StoreError::Unsupported(url.to_string()));
        };
        match &db {
            Database::Sqlite(s) => s.migrate().await?,
            Database::Postgres(s) => s.migrate().await?,
        }
        Ok(db)
    }
}

/// What was copied from one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableReport {
    pub table: &'static str,
    pub rows: u64,
    /// The SHA-256 of the table's rows, the same on both sides.
    pub sha256: String,
}

/// Rows in byte order of their key on both databases (PostgreSQL's default collation
/// may follow a locale; `"C"` is byte order, as SQLite's `BINARY`).
fn select_sql(t: &Table, postgres: bool) -> String {
    let cols: Vec<_> = t.columns.iter().map(|(c, _)| *c).collect();
    let order: Vec<_> = t
        .order_by
        .iter()
        .map(|c| {
            if postgres {
                format!("{c} COLLATE \"C\"")
            } else {
                c.to_string()
            }
        })
        .collect();
    format!(
        "SELECT {} FROM {} ORDER BY {}",
        cols.join(", "),
        t.name,
        order.join(", ")
    )
}

fn insert_sql(t: &Table, postgres: bool) -> String {
    let cols: Vec<_> = t.columns.iter().map(|(c, _)| *c).collect();
    let marks: Vec<_> = (1..=cols.len())
        .map(|i| {
            if postgres {
                format!("${i}")
            } else {
                "?".into()
            }
        })
        .collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        t.name,
        cols.join(", "),
        marks.join(", ")
    )
}

/// Reads one column of a row as its kind says.
fn value<'r, R>(row: &'r R, i: usize, kind: Kind) -> Result<Value, sqlx::Error>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(match kind {
        Kind::Text => row
            .try_get::<Option<String>, _>(i)?
            .map_or(Value::Null, Value::Text),
        Kind::Int => row
            .try_get::<Option<i64>, _>(i)?
            .map_or(Value::Null, Value::Int),
        Kind::Bytes => row
            .try_get::<Option<Vec<u8>>, _>(i)?
            .map_or(Value::Null, Value::Bytes),
    })
}

/// A table's rows as values.
fn rows_of<'r, R>(rows: &'r [R], t: &Table) -> Result<Vec<Vec<Value>>, sqlx::Error>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    rows.iter()
        .map(|r| {
            t.columns
                .iter()
                .enumerate()
                .map(|(i, (_, k))| value(r, i, *k))
                .collect()
        })
        .collect()
}

/// Feeds a row into a table's digest: each value with a tag and its length, so no two
/// different rows hash alike.
fn hash_row(h: &mut Sha256, row: &[Value]) {
    for v in row {
        match v {
            Value::Null => h.update([0u8]),
            Value::Text(s) => {
                h.update([1u8]);
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            Value::Int(n) => {
                h.update([2u8]);
                h.update(n.to_le_bytes());
            }
            Value::Bytes(b) => {
                h.update([3u8]);
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
        }
    }
    h.update([0xffu8]);
}

/// Every table's rows, in primary-key order, read in one transaction.
async fn read_all(db: &Database) -> Result<Vec<Vec<Vec<Value>>>, CopyError> {
    let mut out = Vec::with_capacity(TABLES.len());
    match db {
        Database::Sqlite(s) => {
            let mut tx = s.read_pool().begin().await?;
            for t in TABLES {
                let rows = sqlx::query(&select_sql(t, false))
                    .fetch_all(&mut *tx)
                    .await?;
                out.push(rows_of(&rows, t)?);
            }
            tx.commit().await?;
        }
        Database::Postgres(s) => {
            let mut tx = s.pool().begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            for t in TABLES {
                let rows = sqlx::query(&select_sql(t, true))
                    .fetch_all(&mut *tx)
                    .await?;
                out.push(rows_of(&rows, t)?);
            }
            tx.commit().await?;
        }
    }
    Ok(out)
}

fn reports(tables: &[Vec<Vec<Value>>]) -> Vec<TableReport> {
    TABLES
        .iter()
        .zip(tables)
        .map(|(t, rows)| {
            let mut h = Sha256::new();
            for r in rows {
                hash_row(&mut h, r);
            }
            TableReport {
                table: t.name,
                rows: rows.len() as u64,
                sha256: hex::encode(h.finalize()),
            }
        })
        .collect()
}

/// Binds one value to a query of either database.
macro_rules! bind_value {
    ($q:expr, $v:expr, $kind:expr) => {
        match ($v, $kind) {
            (Value::Null, Kind::Text) => $q.bind(None::<String>),
            (Value::Null, Kind::Int) => $q.bind(None::<i64>),
            (Value::Null, Kind::Bytes) => $q.bind(None::<Vec<u8>>),
            (Value::Text(s), _) => $q.bind(s),
            (Value::Int(n), _) => $q.bind(n),
            (Value::Bytes(b), _) => $q.bind(b),
        }
    };
}

/// Inserts every table's rows inside one transaction of `$pool` (the two databases'
/// transaction types differ, so a macro rather than a generic function).
macro_rules! insert_all {
    ($pool:expr, $postgres:expr, $tables:expr) => {{
        let mut tx = $pool.begin().await?;
        for (t, rows) in TABLES.iter().zip($tables) {
            let sql = insert_sql(t, $postgres);
            for row in rows {
                let mut q = sqlx::query(&sql);
                for (v, (_, k)) in row.iter().zip(t.columns) {
                    q = bind_value!(q, v.clone(), *k);
                }
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
    }};
}

async fn write_all(db: &Database, tables: &[Vec<Vec<Value>>]) -> Result<(), CopyError> {
    match db {
        Database::Sqlite(s) => insert_all!(s.write_pool(), false, tables),
        Database::Postgres(s) => insert_all!(s.pool(), true, tables),
    }
    Ok(())
}

/// The tables of `db` that hold rows, as "N accounts, M tasks"; empty when none do.
async fn occupied(db: &Database) -> Result<String, CopyError> {
    let mut held = Vec::new();
    for t in TABLES {
        let sql = format!("SELECT COUNT(*) FROM {}", t.name);
        let n: i64 = match db {
            Database::Sqlite(s) => sqlx::query_scalar(&sql).fetch_one(s.read_pool()).await?,
            Database::Postgres(s) => sqlx::query_scalar(&sql).fetch_one(s.pool()).await?,
        };
        if n > 0 {
            held.push(format!("{n} {}", t.name));
        }
    }
    Ok(held.join(", "))
}

/// Copies every row of `from` into `to`, which must be empty (after migrations), then
/// reads `to` back and compares each table's count and checksum with the source's.
pub async fn copy_database(
    from: &Database,
    to: &Database,
    to_name: &str,
) -> Result<Vec<TableReport>, CopyError> {
    let held = occupied(to).await?;
    if !held.is_empty() {
        return Err(CopyError::NotEmpty(to_name.to_string(), held));
    }
    let tables = read_all(from).await?;
    write_all(to, &tables).await?;
    let want = reports(&tables);
    let got = reports(&read_all(to).await?);
    for (w, g) in want.iter().zip(&got) {
        if w != g {
            return Err(CopyError::Mismatch(format!(
                "table {}: {} rows with SHA-256 {} copied, {} rows with SHA-256 {} read back",
                w.table, w.rows, w.sha256, g.rows, g.sha256
            )));
        }
    }
    Ok(want)
}

/// What was copied from one storage to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesReport {
    pub files: u64,
    pub bytes: u64,
    /// SHA-256 over every file's key and content, in key order; the same on both sides.
    pub sha256: String,
}

/// Copies every file of `from` into `to`, which must hold none, then reads each back
/// and compares it with the source.
pub async fn copy_files(from: &Blobs, to: &Blobs, to_name: &str) -> Result<FilesReport, CopyError> {
    let existing = to.list_all().await?;
    if !existing.is_empty() {
        return Err(CopyError::NotEmpty(
            to_name.to_string(),
            format!("{} files", existing.len()),
        ));
    }
    let keys = from.list_all().await?;
    let (mut h_from, mut h_to) = (Sha256::new(), Sha256::new());
    let mut bytes = 0u64;
    for key in &keys {
        let data = from.get(key).await?;
        to.put(key, data.clone()).await?;
        let back = to.get(key).await?;
        if back != data {
            return Err(CopyError::Mismatch(format!(
                "file {key}: {} bytes written, {} bytes read back differ",
                data.len(),
                back.len()
            )));
        }
        for (h, d) in [(&mut h_from, &data), (&mut h_to, &back)] {
            h.update((key.len() as u64).to_le_bytes());
            h.update(key.as_bytes());
            h.update((d.len() as u64).to_le_bytes());
            h.update(d);
        }
        bytes += data.len() as u64;
    }
    let listed = to.list_all().await?;
    if listed != keys {
        return Err(CopyError::Mismatch(format!(
            "{} files copied, {} listed in the target",
            keys.len(),
            listed.len()
        )));
    }
    let (a, b) = (hex::encode(h_from.finalize()), hex::encode(h_to.finalize()));
    if a != b {
        return Err(CopyError::Mismatch(format!(
            "files' SHA-256 {a} at the source, {b} in the target"
        )));
    }
    Ok(FilesReport {
        files: keys.len() as u64,
        bytes,
        sha256: a,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_hashes_tell_values_apart() {
        let digest = |rows: &[Vec<Value>]| {
            let mut h = Sha256::new();
            for r in rows {
                hash_row(&mut h, r);
            }
            hex::encode(h.finalize())
        };
        let a = vec![vec![Value::Text("ab".into()), Value::Text("c".into())]];
        let b = vec![vec![Value::Text("a".into()), Value::Text("bc".into())]];
        let c = vec![vec![Value::Null, Value::Text("c".into())]];
        let d = vec![vec![Value::Text(String::new()), Value::Text("c".into())]];
        let e = vec![vec![Value::Int(1)]];
        let f = vec![vec![Value::Bytes(1i64.to_le_bytes().to_vec())]];
        let all = [&a, &b, &c, &d, &e, &f].map(|r| digest(r));
        for i in 0..all.len() {
            for j in 0..i {
                assert_ne!(all[i], all[j], "{i} vs {j}");
            }
        }
        assert_eq!(digest(&a), digest(&a.clone()));
    }

    #[test]
    fn statements_name_every_column() {
        let t = &TABLES[0];
        assert_eq!(
            select_sql(t, false),
            "SELECT id, name, credits, webhook_secret, create_time FROM accounts ORDER BY id"
        );
        assert_eq!(
            select_sql(&TABLES[4], true),
            "SELECT account_id, key, body_hash, task_id, create_time FROM idempotency_keys \
             ORDER BY account_id COLLATE \"C\", key COLLATE \"C\""
        );
        assert_eq!(
            insert_sql(t, true),
            "INSERT INTO accounts (id, name, credits, webhook_secret, create_time) VALUES ($1, $2, $3, $4, $5)"
        );
        assert_eq!(
            insert_sql(t, false),
            "INSERT INTO accounts (id, name, credits, webhook_secret, create_time) VALUES (?, ?, ?, ?, ?)"
        );
    }
}
