//! File storage for uploads and results, on top of `object_store`: a directory on the
//! local disk (`file://DIR`) or an S3-compatible bucket (`s3://bucket/prefix`, through
//! `object_store`'s S3 client, which can also sign time-limited GET URLs for it).
//!
//! Keys are relative paths such as `results/<task>/<token>/0.png`. The token is 128
//! random bits, which is what makes a result URL unguessable. A key is checked before
//! use: no `..`, no empty segments, only `[A-Za-z0-9._-]` in segments, so a URL path
//! can never reach outside the store.
//!
//! [`classify_url`] tells whether a user-supplied URL is one of this server's own files,
//! whatever its spelling, so workers read it from storage under the ownership rule
//! instead of fetching it over HTTP.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::signer::Signer;
use object_store::{ObjectStore, PutPayload};
use remixd_domain::ServerOrigin;

/// Errors of the file storage.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("not found")]
    NotFound,
    #[error("invalid file key {0:?}")]
    BadKey(String),
    #[error("unsupported storage URL {0:?}")]
    Unsupported(String),
    #[error("storage error: {0}")]
    Store(#[from] object_store::Error),
    #[error("storage IO error: {0}")]
    Io(#[from] std::io::Error),
}

impl BlobError {
    /// Whether the storage is out of space (`ENOSPC` anywhere in the error's chain).
    pub fn is_full(&self) -> bool {
        let mut e: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = e {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                if io.raw_os_error() == Some(28) {
                    return true;
                }
            }
            e = err.source();
        }
        false
    }
}

/// A handle to the file storage; cheap to clone.
#[derive(Clone)]
pub struct Blobs {
    inner: Arc<dyn ObjectStore>,
    describe: String,
    /// The root directory, for storage on the local disk: deleting a key there leaves its
    /// directories behind, which [`Blobs::delete`] and [`Blobs::delete_prefix`] prune.
    local: Option<std::path::PathBuf>,
    /// For a bucket: its client, and the prefix keys live under, to sign URLs with.
    bucket: Option<(Arc<AmazonS3>, String)>,
}

/// How to reach an S3-compatible bucket (`storage.s3.*`). Unset values come from the
/// environment as the AWS tools read it (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_REGION`, `AWS_ENDPOINT_URL`…).
#[derive(Clone, Default)]
pub struct S3Options {
    /// A custom endpoint (`http://127.0.0.1:9000`) for servers other than AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key: Option<String>,
    pub secret: Option<String>,
    /// `bucket` in the path (`endpoint/bucket/key`) rather than in the host name.
    pub path_style: bool,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "access_key",
                &self.access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("path_style", &self.path_style)
            .finish()
    }
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs").field("at", &self.describe).finish()
    }
}

/// Whether `key` is a safe relative storage path.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 512
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// What a user-supplied URL is to this server's file storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileUrl {
    /// Another server's URL: fetch it (under the address policy).
    Foreign,
    /// This server's file under a public prefix (`results/` or `uploads/`): read it
    /// from storage under the ownership rule, never over HTTP.
    File(String),
    /// This server, but not one of its files (an API route, `inputs/`, a malformed
    /// key): refused, never fetched.
    NotAFile,
}

/// Classifies a URL against this server's every spelling ([`ServerOrigin`]): the URL is
/// parsed the WHATWG way (scheme and host lower-cased, `127.1` read as 127.0.0.1, `.`,
/// `..`, `%2e` segments removed), its path percent-decoded (so `uploads%2F…` is
/// `uploads/…`, as the file route reads it), and query and fragment ignored.
pub fn classify_url(origin: &ServerOrigin, url: &str) -> FileUrl {
    let Ok(u) = url::Url::parse(url.trim()) else {
        return FileUrl::Foreign;
    };
    if !matches!(u.scheme(), "http" | "https") {
        return FileUrl::Foreign;
    }
    // This server's `/files/<key>`, or `<key>` under its bucket's base (a presigned link).
    let (raw, prefix) = if origin.designates_url(&u) {
        (u.path(), "/files/")
    } else if let Some(rest) = origin.bucket_path(&u) {
        (rest, "")
    } else {
        return FileUrl::Foreign;
    };
    let Ok(path) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return FileUrl::NotAFile;
    };
    match path.strip_prefix(prefix) {
        Some(key) if valid_key(key) && PUBLIC_PREFIXES.iter().any(|p| key.starts_with(p)) => {
            FileUrl::File(key.to_string())
        }
        _ => FileUrl::NotAFile,
    }
}

/// Storage prefixes served under `/files/` and usable as task inputs.
pub const PUBLIC_PREFIXES: [&str; 2] = ["results/", "uploads/"];

/// The task whose result a `results/<task>/…` key is, if it is one.
pub fn result_task(key: &str) -> Option<&str> {
    key.strip_prefix("results/")?.split('/').next()
}

fn path(key: &str) -> Result<Path, BlobError> {
    if !valid_key(key) {
        return Err(BlobError::BadKey(key.to_string()));
    }
    Path::parse(key).map_err(|_| BlobError::BadKey(key.to_string()))
}

impl Blobs {
    /// Opens storage at a `file://DIR` URL (creating the directory).
    pub fn open(url: &str) -> Result<Self, BlobError> {
        Self::open_with(url, &S3Options::default())
    }

    /// Opens storage at a `file://DIR` URL (creating the directory) or an
    /// `s3://bucket[/prefix]` URL reached with `s3`. Opening a bucket does not contact
    /// it: [`Blobs::probe`] does.
    pub fn open_with(url: &str, s3: &S3Options) -> Result<Self, BlobError> {
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)?;
            let fs = LocalFileSystem::new_with_prefix(dir)?;
            return Ok(Self {
                inner: Arc::new(fs),
                describe: url.to_string(),
                local: Some(std::path::absolute(dir)?),
                bucket: None,
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() || !(prefix.is_empty() || valid_key(prefix)) {
                return Err(BlobError::Unsupported(format!(
                    "{url} (expected s3://bucket or s3://bucket/prefix, the prefix made of \
                     [A-Za-z0-9._-] segments)"
                )));
            }
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_virtual_hosted_style_request(!s3.path_style);
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            } else if std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            {
                b = b.with_region("us-east-1");
            }
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
            }
            if let Some(k) = &s3.access_key {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret {
                b = b.with_secret_access_key(k);
            }
            let client = Arc::new(b.build()?);
            let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
                client.clone()
            } else {
                let shared: Arc<dyn ObjectStore> = client.clone();
                Arc::new(PrefixStore::new(shared, prefix))
            };
            return Ok(Self {
                inner,
                describe: url.to_string(),
                local: None,
                bucket: Some((client, prefix.to_string())),
            });
        }
        Err(BlobError::Unsupported(url.to_string()))
    }

    /// Storage on any `object_store` backend (tests wrap one to make it slow or fail).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, describe: &str) -> Self {
        Self {
            inner,
            describe: describe.to_string(),
            local: None,
            bucket: None,
        }
    }

    /// Whether the files are in a bucket that can sign URLs ([`Blobs::presigned_get`]).
    pub fn can_presign(&self) -> bool {
        self.bucket.is_some()
    }

    /// A URL of the bucket that lets whoever holds it GET `key` for `expires_in`, signed
    /// with the storage's credentials; `None` when the files are not in a bucket.
    pub async fn presigned_get(
        &self,
        key: &str,
        expires_in: std::time::Duration,
    ) -> Result<Option<url::Url>, BlobError> {
        let Some((client, prefix)) = &self.bucket else {
            return Ok(None);
        };
        let full = if prefix.is_empty() {
            path(key)?
        } else {
            path(&format!("{prefix}/{key}"))?
        };
        Ok(Some(
            client
                .signed_url(http::Method::GET, &full, expires_in)
                .await?,
        ))
    }

    /// The URL this bucket's presigned links start with, up to the storage's prefix and
    /// its final `/` (what [`ServerOrigin::with_bucket`] takes); `None` when the files
    /// are not in a bucket. Signs a link to a key that need not exist, and cuts it.
    pub async fn presigned_base(&self) -> Result<Option<url::Url>, BlobError> {
        const PROBE: &str = "presigned-base-probe";
        let Some(mut u) = self
            .presigned_get(PROBE, std::time::Duration::from_secs(60))
            .await?
        else {
            return Ok(None);
        };
        let Some(base) = u.path().strip_suffix(PROBE).map(str::to_string) else {
            return Ok(None);
        };
        u.set_path(&base);
        u.set_query(None);
        u.set_fragment(None);
        Ok(Some(u))
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        self.inner.put(&path(key)?, PutPayload::from(bytes)).await?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        match self.inner.get(&path(key)?).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    /// The root directory when the files are on the local disk (for free-space checks).
    pub fn local_dir(&self) -> Option<&std::path::Path> {
        self.local.as_deref()
    }

    /// Deletes a key; deleting a missing key is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.inner.delete(&path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(parent) = key.rsplit_once('/').map(|(p, _)| p) {
            self.prune_dirs(parent, false).await;
        }
        Ok(())
    }

    /// On the local disk, removes the now empty directories of `prefix`: with `inside`,
    /// every empty directory under it first; then `prefix` itself and its parents while
    /// they are empty, but never a top-level directory (`inputs`, `results`, `uploads`).
    /// Only empty directories are removed (`remove_dir`), so a file written meanwhile is
    /// never lost; a directory that is not empty simply stays.
    async fn prune_dirs(&self, prefix: &str, inside: bool) {
        let Some(root) = self.local.clone() else {
            return;
        };
        let prefix = prefix.to_string();
        let _ = tokio::task::spawn_blocking(move || {
            fn empty_dirs_below(dir: &std::path::Path) {
                let Ok(entries) = std::fs::read_dir(dir) else {
                    return;
                };
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        empty_dirs_below(&e.path());
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            if inside {
                empty_dirs_below(&root.join(&prefix));
            }
            let mut rel = Some(prefix.as_str());
            while let Some(r) = rel.filter(|r| r.contains('/')) {
                if std::fs::remove_dir(root.join(r)).is_err() {
                    break;
                }
                rel = r.rsplit_once('/').map(|(p, _)| p);
            }
        })
        .await;
    }

    /// Deletes every key under a prefix (`inputs/<task>`, say).
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), BlobError> {
        use futures::TryStreamExt;
        let p = path(prefix)?;
        let keys: Vec<_> = self
            .inner
            .list(Some(&p))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        for k in keys {
            match self.inner.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.prune_dirs(prefix, true).await;
        Ok(())
    }

    /// The names of the "directories" directly under `prefix` (`results` → task ids).
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, BlobError> {
        let listing = match self.inner.list_with_delimiter(Some(&path(prefix)?)).await {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Every key in the storage, sorted (the store copy).
    pub async fn list_all(&self) -> Result<Vec<String>, BlobError> {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = self
            .inner
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await?;
        keys.sort();
        Ok(keys)
    }

    /// Writes and reads back a small probe object, for `/readyz`.
    pub async fn probe(&self) -> Result<(), BlobError> {
        let key = "readyz-probe";
        self.put(key, Bytes::from_static(b"ok")).await?;
        self.get(key).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for good in ["results/abc/0.png", "a", "inputs/0193/style-0"] {
            assert!(valid_key(good), "{good}");
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/../b",
            "/abs",
            "a//b",
            "a/",
            "a b",
            "a/./b",
            "ü",
        ] {
            assert!(!valid_key(bad), "{bad}");
        }
    }

    #[test]
    fn file_urls_by_any_spelling() {
        let o = ServerOrigin::new(
            "http://127.0.0.1:8080",
            Some("127.0.0.1:8080".parse().unwrap()),
        )
        .unwrap();
        let file = |k: &str| FileUrl::File(k.to_string());
        let up = "uploads/ab/x/a.png";
        for url in [
            "http://127.0.0.1:8080/files/uploads/ab/x/a.png",
            "HTTP://127.0.0.1:8080/files/uploads/ab/x/a.png",
            "http://127.1:8080/files/uploads/ab/x/a.png",
            "http://localhost:8080/files/uploads/ab/x/a.png",
            "http://localhost.:8080/files/uploads/ab/x/a.png",
            "http://[::1]:8080/files/uploads/ab/x/a.png",
            "http://0.0.0.0:8080/files/uploads/ab/x/a.png",
            "http://127.0.0.1:8080/files/uploads%2Fab%2fx/a.png",
            "http://127.0.0.1:8080/files/./uploads/ab/x/a.png",
            "http://127.0.0.1:8080/files/%2e/uploads/ab/x/a.png",
            "http://127.0.0.1:8080/files/%2E/uploads/ab/zz/../x/a.png",
            "http://127.0.0.1:8080/files/%75ploads/ab/x/a.png",
            "http://127.0.0.1:8080/x/../files/uploads/ab/x/a.png",
            "http://127.0.0.1:8080\\files\\uploads/ab/x/a.png",
            "  http://127.0.0.1:8080/files/uploads/ab/x/a.png?expires=1&signature=ab#f",
        ] {
            assert_eq!(classify_url(&o, url), file(up), "{url}");
        }
        assert_eq!(
            classify_url(&o, "http://127.0.0.1:8080/files/results/t/k/0.png"),
            file("results/t/k/0.png")
        );
        for url in [
            "http://127.0.0.1:8080/files/inputs/t/base",
            "http://127.0.0.1:8080/files/uploads/..%2F..%2Fx",
            "http://127.0.0.1:8080/files/uploads/%ff",
            "http://127.0.0.1:8080/api/v1/jobs/recordInfo",
            "http://localhost:8080/",
        ] {
            assert_eq!(classify_url(&o, url), FileUrl::NotAFile, "{url}");
        }
        for url in [
            "http://127.0.0.1:9999/files/uploads/ab/x/a.png",
            "http://evil.example/files/uploads/ab/a.png",
            "ftp://127.0.0.1:8080/files/uploads/ab/x/a.png",
            "not a url",
        ] {
            assert_eq!(classify_url(&o, url), FileUrl::Foreign, "{url}");
        }
        assert_eq!(result_task("results/t1/k/0.png"), Some("t1"));
        assert_eq!(result_task("uploads/t1/k/0.png"), None);
    }

    #[test]
    fn the_buckets_urls_of_its_files_are_this_servers_files() {
        let base = url::Url::parse("http://127.0.0.1:9000/remixd/files/").unwrap();
        let o = ServerOrigin::new("http://127.0.0.1:8080", None)
            .unwrap()
            .with_bucket(base);
        let file = |k: &str| FileUrl::File(k.to_string());
        for url in [
            "http://127.0.0.1:9000/remixd/files/results/t/k/0.png?X-Amz-Signature=ab",
            "HTTP://127.1:9000/remixd/files/results/t/k/0.png",
            "http://127.0.0.1:9000/remixd/files/results%2Ft/k/0.png",
            "http://127.0.0.1:9000/remixd/files/x/../results/t/k/0.png",
        ] {
            assert_eq!(classify_url(&o, url), file("results/t/k/0.png"), "{url}");
        }
        for url in [
            "http://127.0.0.1:9000/remixd/files/inputs/t/base",
            "http://127.0.0.1:9000/remixd/files/results/..%2F..%2Fx",
        ] {
            assert_eq!(classify_url(&o, url), FileUrl::NotAFile, "{url}");
        }
        for url in [
            "http://127.0.0.1:9000/remixd/files/../other/results/t/k/0.png",
            "http://127.0.0.1:9000/remixd/results/t/k/0.png",
            "https://127.0.0.1:9000/remixd/files/results/t/k/0.png",
            "http://127.0.0.1:9001/remixd/files/results/t/k/0.png",
        ] {
            assert_eq!(classify_url(&o, url), FileUrl::Foreign, "{url}");
        }
        assert_eq!(
            classify_url(&o, "http://127.0.0.1:8080/files/uploads/ab/x/a.png"),
            file("uploads/ab/x/a.png"),
            "the server's own URLs still count"
        );
    }

    #[tokio::test]
    async fn round_trip_and_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::open(&format!("file://{}", dir.path().display())).unwrap();
        b.put("x/y/0.png", Bytes::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(
            b.get("x/y/0.png").await.unwrap(),
            Bytes::from_static(b"hello")
        );
        b.delete_prefix("x").await.unwrap();
        assert!(matches!(b.get("x/y/0.png").await, Err(BlobError::NotFound)));
        b.probe().await.unwrap();
    }

    /// Deleting leaves no empty directories behind (one per task and upload otherwise),
    /// keeps the top-level ones, and never touches a directory that still holds a file.
    #[tokio::test]
    async fn deleting_prunes_empty_directories() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::open(&format!("file://{}", dir.path().display())).unwrap();
        let put = |k: &'static str| b.put(k, Bytes::from_static(b"x"));
        put("inputs/t1/base").await.unwrap();
        put("inputs/t1/style-0").await.unwrap();
        put("inputs/t2/base").await.unwrap();
        put("uploads/tok/images/a/b.png").await.unwrap();
        put("uploads/tok/images/keep.png").await.unwrap();
        b.delete_prefix("inputs/t1").await.unwrap();
        assert!(!dir.path().join("inputs/t1").exists(), "task dir pruned");
        assert!(dir.path().join("inputs/t2/base").exists(), "others kept");
        b.delete_prefix("inputs/t2").await.unwrap();
        assert!(dir.path().join("inputs").is_dir(), "top level kept");
        b.delete("uploads/tok/images/a/b.png").await.unwrap();
        assert!(!dir.path().join("uploads/tok/images/a").exists());
        assert!(dir.path().join("uploads/tok/images/keep.png").exists());
        b.delete("uploads/tok/images/keep.png").await.unwrap();
        assert!(!dir.path().join("uploads/tok").exists());
        assert!(dir.path().join("uploads").is_dir());
    }
}
