//! Accounts, API keys and their limits.
//!
//! A key is `rmx_<key id>_<secret>`: the key id (16 hex digits) finds the record, the
//! whole key's SHA-256 is what is stored, and the comparison happens in constant time
//! (in the api crate). The secret carries 256 bits of entropy, so a fast hash is enough:
//! there is nothing to brute-force.

use serde::{Deserialize, Serialize};

/// An account's id (a UUIDv7 in simple form).
pub type AccountId = String;
/// An API key's public id, 16 lowercase hex digits; safe to print and log.
pub type KeyId = String;

/// A whole API key as a client sends it. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyToken(pub String);

impl std::fmt::Debug for ApiKeyToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKeyToken(<redacted>)")
    }
}

/// A key split into its parts, without any check of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedKey {
    pub key_id: KeyId,
}

/// The prefix of every remixd key.
pub const KEY_PREFIX: &str = "rmx_";

impl ApiKeyToken {
    /// Builds a key from its id and 32 random bytes.
    pub fn assemble(key_id: &str, secret: &[u8; 32]) -> Self {
        let mut s = String::with_capacity(4 + 16 + 1 + 64);
        s.push_str(KEY_PREFIX);
        s.push_str(key_id);
        s.push('_');
        for b in secret {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// Finds the key id in a presented key; `None` when the shape is wrong.
    pub fn parse(&self) -> Option<ParsedKey> {
        let rest = self.0.strip_prefix(KEY_PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if id.len() != 16 || !hex(id) || secret.len() != 64 || !hex(secret) {
            return None;
        }
        Some(ParsedKey {
            key_id: id.to_string(),
        })
    }
}

/// A key's own usage caps, in credits charged through that key.
///
/// Credits of tasks that failed (and were refunded) do not count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyLimits {
    pub hourly: Option<i64>,
    pub daily: Option<i64>,
    pub total: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_hide_their_secret() {
        let k = ApiKeyToken::assemble("0123456789abcdef", &[7u8; 32]);
        assert_eq!(k.parse().unwrap().key_id, "0123456789abcdef");
        assert!(!format!("{k:?}").contains("0707"));
    }

    #[test]
    fn malformed_keys_do_not_parse() {
        for bad in [
            "",
            "rmx_",
            "rmx_0123_abcd",
            "sk-0123456789abcdef",
            &format!("rmx_0123456789abcdeg_{}", "0".repeat(64)),
        ] {
            assert!(ApiKeyToken(bad.to_string()).parse().is_none(), "{bad}");
        }
    }
}
