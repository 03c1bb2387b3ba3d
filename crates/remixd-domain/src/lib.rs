//! remixd's domain: the pure types and rules every other crate speaks in.
//!
//! Nothing here performs IO. A request is turned into these types once, at the edge
//! (the api crate), and everything after works on values that are valid by
//! construction: a [`TaskInput`] cannot hold a strength of 7 or five images.

pub mod account;
pub mod input;
pub mod origin;
pub mod prompt;
pub mod task;

pub use account::{AccountId, ApiKeyToken, KeyId, KeyLimits, ParsedKey};
pub use input::{
    CreditPrices, ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style, TaskInput,
    MODEL_NAME,
};
pub use origin::ServerOrigin;
pub use task::{FailCode, TaskId, TaskState};

/// Milliseconds since the Unix epoch: the one time unit of storage and the API.
pub type Millis = i64;

/// The current time in Unix milliseconds.
///
/// The only clock read in this crate; callers that need control over time pass
/// their own `Millis` values into the store instead.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}
