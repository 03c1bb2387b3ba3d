//! A real, small filesystem for the full-disk tests: a tmpfs of a few megabytes mounted
//! on a temporary directory, which a test fills to the last byte and frees again.
//!
//! Mounting needs root (CI runs the suite as root). A test that needs a full disk says
//! so loudly instead of passing without one: [`Tmpfs::mount`] panics with the reason.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs; unmounted (lazily, so open files do not block it) when dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
    filler: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` on a fresh temporary directory.
    pub fn mount(size_bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_bytes},mode=0700"))
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a {size_bytes}-byte tmpfs to run out of disk for real, which \
             needs root (CI runs the tests as root): mount said {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let filler = dir.path().join("filler");
        Self { dir, filler }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Free bytes left on the filesystem.
    pub fn free_bytes(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .expect("running df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }

    /// Writes a filler file until the filesystem refuses another byte. Returns its size.
    pub fn fill(&self) -> u64 {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("open filler");
        let chunk = vec![0x5a_u8; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Smaller writes for the last partial block.
        while let Ok(1) = f.write(&[0x5a]) {}
        let _ = f.sync_all();
        std::fs::metadata(&self.filler)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Deletes the filler file: the space is back.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
