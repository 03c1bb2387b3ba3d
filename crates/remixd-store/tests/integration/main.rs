//! Every integration test of this crate, in one test binary.
//!
//! Each test binary links the whole dependency tree (about 250 MB each with the
//! server's); one binary per file made a clean build link dozens of them and fill the
//! disk. nextest still runs every test in its own process, so the files stay as
//! independent as they were: each module is one former test file.

mod full_disk;
mod postgres_contract;
mod reaper_rows;
mod s3_blobs;
mod sqlite_contract;
