//! Every integration test of this crate, in one test binary.
//!
//! Each test binary links the whole dependency tree (about 250 MB each with the
//! server's); one binary per file made a clean build link dozens of them and fill the
//! disk. nextest still runs every test in its own process, so the files stay as
//! independent as they were: each module is one former test file.

mod common;
mod engine;
mod flux2_parity;
mod flux2_text_parity;
mod flux2_transformer_parity;
mod loader;
mod pipeline_parity;
mod scheduler_parity;
mod text_parity;
mod unet_parity;
mod vae_parity;
