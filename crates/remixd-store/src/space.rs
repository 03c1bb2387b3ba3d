//! Free space on the filesystems remixd writes to.
//!
//! A full disk must not turn into a stream of half-done work: while the database's or the
//! files' filesystem has less than the configured minimum free, the API refuses new
//! tasks and uploads with a clear "storage is full" answer, `/readyz` says not ready, and
//! the workers leave queued tasks where they are instead of failing them. Everything
//! resumes by itself once space is back; nothing accepted is lost.
//!
//! `statvfs` costs a system call of about a microsecond, so every check asks the kernel
//! afresh rather than caching a figure that could be stale.

use std::path::PathBuf;
use std::sync::Arc;

/// A filesystem with less free space than the minimum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpaceError {
    /// Under the minimum: `what` is `database` or `files`.
    #[error("the {what} filesystem has {} free, under the minimum of {}", mb(*free), mb(*min_free))]
    Low {
        what: &'static str,
        free: u64,
        min_free: u64,
    },
    /// The free space could not be read (the directory is gone, say).
    #[error("the free space of the {what} filesystem cannot be read: {error}")]
    Unreadable { what: &'static str, error: String },
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Checks the free space of the directories remixd writes to; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SpaceGuard {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// What each directory holds (`database`, `files`) and where it is.
    dirs: Vec<(&'static str, PathBuf)>,
    min_free: u64,
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl SpaceGuard {
    /// Watches `dirs`, each named by what it holds; `min_free` 0 turns the check off.
    pub fn new(dirs: Vec<(&'static str, PathBuf)>, min_free: u64) -> Self {
        Self {
            inner: Arc::new(Inner { dirs, min_free }),
        }
    }

    /// Ok while every watched filesystem has at least the minimum free.
    pub fn check(&self) -> Result<(), SpaceError> {
        if self.inner.min_free == 0 {
            return Ok(());
        }
        for (what, dir) in &self.inner.dirs {
            let free = free_bytes(dir).map_err(|e| SpaceError::Unreadable {
                what,
                error: e.kind().to_string(),
            })?;
            if free < self.inner.min_free {
                return Err(SpaceError::Low {
                    what,
                    free,
                    min_free: self.inner.min_free,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimum_above_the_free_space_is_low_and_zero_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        let ok = SpaceGuard::new(vec![("files", dir.path().into())], 1);
        assert_eq!(ok.check(), Ok(()));
        let low = SpaceGuard::new(vec![("files", dir.path().into())], u64::MAX);
        match low.check() {
            Err(SpaceError::Low { what: "files", .. }) => {}
            other => panic!("{other:?}"),
        }
        let off = SpaceGuard::new(vec![("files", dir.path().into())], 0);
        assert_eq!(off.check(), Ok(()));
        let gone = SpaceGuard::new(vec![("database", dir.path().join("nope"))], 1);
        assert!(matches!(
            gone.check(),
            Err(SpaceError::Unreadable {
                what: "database",
                ..
            })
        ));
        // Messages name no path.
        let msg = low.check().unwrap_err().to_string();
        assert!(!msg.contains(&*dir.path().to_string_lossy()), "{msg}");
    }
}
