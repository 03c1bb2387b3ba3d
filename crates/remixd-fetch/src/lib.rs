//! remixd-fetch: the only code in remixd that opens sockets to user-supplied URLs.
//!
//! - [`policy`]: which addresses may be reached (a pure classifier over `IpAddr` and the
//!   `fetch.allow` exceptions);
//! - [`client`]: downloads that apply the policy to every resolved address and every
//!   redirect hop, connect only to checked addresses, stop reading at a byte cap and
//!   give up after a timeout;
//! - [`images`]: sniffing (JPEG, PNG, WebP, from the bytes), the header check (displayed
//!   size after EXIF orientation, pixel limit, truncated files refused), and decoding
//!   straight to 8 bits, reduced to the size the caller needs, under a process-wide
//!   bound on decodes in flight ([`DecodeGate`]); a decompression bomb is refused before
//!   it allocates.
//!
//! Error texts are phrases that follow a field name: the worker writes
//! `format!("{field} {error}")` into the task's `failMsg`.

pub mod client;
pub mod images;
pub mod policy;

use std::net::IpAddr;
use std::time::Duration;

pub use client::{Fetcher, SharedBudget};
pub use images::{
    check_complete, decode_luma, decode_luma_within, decode_rgb, decode_rgb_within,
    needs_orientation, probe, sniff, DecodeGate, FetchedImage, ImageKind, Reduce, TaskPixels,
};
pub use policy::{classify, AddressClass, AddressPolicy};

/// Settings of the fetcher (`fetch.*`).
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Host names or CIDRs exempt from the address policy.
    pub allow: Vec<String>,
    /// Bound on a whole download, redirects and body included.
    pub timeout: Duration,
    /// Bound on all of one task's downloads together (`fetch.task_timeout_s`).
    pub task_timeout: Duration,
    /// This server itself: never connected to, whatever `allow` says, so no spelling of
    /// its own URLs can make it fetch its files over HTTP (`None`: not known).
    pub origin: Option<remixd_domain::ServerOrigin>,
    /// Largest image, in bytes.
    pub max_image_bytes: u64,
    /// Largest decoded image, in pixels (width × height).
    pub max_pixels: u64,
    /// Largest sum of width × height over all images of one task.
    pub max_task_pixels: u64,
    /// Decodes running at once in the process (see [`DecodeGate`]).
    pub decode_concurrency: usize,
    pub user_agent: String,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            timeout: Duration::from_secs(30),
            task_timeout: Duration::from_secs(60),
            origin: None,
            max_image_bytes: 10 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_task_pixels: 120_000_000,
            decode_concurrency: 2,
            user_agent: concat!("remixd/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// Why a fetch failed. `Display` follows a field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("is not a usable URL: {0}")]
    BadUrl(String),
    #[error("points to a blocked address {}({why})", ip.map(|i| format!("{i} ")).unwrap_or_default())]
    Blocked {
        host: String,
        ip: Option<IpAddr>,
        why: String,
    },
    #[error("is unreachable: {0}")]
    Unreachable(String),
    #[error("answered HTTP status {0}")]
    Status(u16),
    #[error("is too large (over {limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("is too large: with the other images of its field it is over {limit} bytes")]
    GroupTooLarge { limit: u64 },
    #[error("timed out after {secs} s")]
    Timeout { secs: u64 },
    #[error("was still downloading when the task's {secs} s limit for all its downloads (fetch.task_timeout_s) ran out")]
    TaskTimeout { secs: u64 },
    #[error("redirected more than {} times", client::MAX_REDIRECTS)]
    TooManyRedirects,
    #[error("is not a JPEG, PNG or WebP image")]
    NotImage,
    #[error("has dimensions {width}x{height}, above the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("is truncated: {0}")]
    Truncated(String),
    #[error("brings the task's images to {total} pixels, above the limit of {limit} pixels for all images of a task together")]
    TaskPixels { total: u64, limit: u64 },
    #[error("could not be decoded: {0}")]
    Decode(String),
    #[error("invalid fetch setting: {0}")]
    Config(String),
}
