//! File storage for uploads and results, on top of `object_store`.
//!
//! Keys are relative paths such as `results/<task>/<token>/0.png`. The token is 128
//! random bits, which is what makes a result URL unguessable. A key is checked before
//! use: no `..`, no empty segments, only `[A-Za-z0-9._-]` in segments, so a URL path
//! can never reach outside the store.

use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

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

/// A handle to the file storage; cheap to clone.
#[derive(Clone)]
pub struct Blobs {
    inner: Arc<dyn ObjectStore>,
    describe: String,
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

/// The storage key behind a `<public_url>/files/<key>` URL of this server, if the URL is
/// one and names a public prefix (`results/` or `uploads/`); query and fragment ignored.
pub fn key_of_public_url(public_url: &str, url: &str) -> Option<String> {
    let rest = url
        .strip_prefix(public_url.trim_end_matches('/'))?
        .strip_prefix("/files/")?;
    let key = rest.split(['?', '#']).next()?;
    (valid_key(key) && (key.starts_with("results/") || key.starts_with("uploads/")))
        .then(|| key.to_string())
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
        if let Some(dir) = url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)?;
            let fs = LocalFileSystem::new_with_prefix(dir)?;
            return Ok(Self {
                inner: Arc::new(fs),
                describe: url.to_string(),
            });
        }
        Err(BlobError::Unsupported(url.to_string()))
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

    /// Deletes a key; deleting a missing key is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.inner.delete(&path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
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
        Ok(())
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
}
