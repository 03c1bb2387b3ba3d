//! One error type for loading and running models.

use std::path::PathBuf;

/// What can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the diffusers layout requires is absent.
    #[error("missing file {0}")]
    MissingFile(PathBuf),
    /// A config file could not be read or parsed.
    #[error("bad config {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    /// The config names something remixd does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A weight has the wrong shape or is missing, or a tensor operation failed.
    #[error("{context}: {source}")]
    Tensor {
        context: String,
        #[source]
        source: candle_core::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Tokenizer(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The caller asked the run to stop.
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads and parses a JSON config file, naming the file in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::MissingFile(path.to_owned()),
        _ => Error::Io(e),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Adds context (which component, which file) to a candle error.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, candle_core::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Tensor {
            context: what(),
            source,
        })
    }
}
