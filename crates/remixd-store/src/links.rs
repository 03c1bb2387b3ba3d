//! Signed links to this server's files: `<public_url>/files/<key>?expires=<unix
//! ms>&signature=<hex HMAC-SHA256 of "key\nexpires">`, keyed by a secret kept in the
//! database (`server_values`), so every node (API and worker alike) signs and checks
//! the same way. The API hands them out (`download-url`, private files); workers give
//! them to upstream providers so that they can read a task's uploaded inputs.
//!
//! A signature counts only in its canonical form (64 lower-case hex digits), compared in
//! constant time: an upper-cased or missing signature is not a signed link.

use hmac::{Hmac, Mac};
use rand::RngCore;
use remixd_domain::Millis;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::{Store, StoreError};

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks links with the server's link key.
#[derive(Clone)]
pub struct LinkSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner(<redacted>)")
    }
}

impl LinkSigner {
    /// The signer with the database's link key, created on first use.
    pub async fn load(store: &dyn Store) -> crate::Result<Self> {
        let v = store
            .server_value("download_link_key", &|| {
                let mut k = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                hex::encode(k)
            })
            .await?;
        let key =
            hex::decode(&v).map_err(|e| StoreError::Corrupt(format!("download_link_key: {e}")))?;
        Ok(Self { key })
    }

    /// A signer with a given key (tests; production loads it with [`LinkSigner::load`]).
    pub fn from_key(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// The canonical signature: lower-case hex.
    pub fn signature(&self, file_key: &str, expires: i64) -> String {
        self.tag(&format!("{file_key}\n{expires}"))
    }

    /// The HMAC of `message`, lower-case hex. Messages of different uses must not be
    /// confusable: a file key holds no newline, so "key\nexpires" has exactly one.
    pub fn tag(&self, message: &str) -> String {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("any key length");
        m.update(message.as_bytes());
        hex::encode(m.finalize().into_bytes())
    }

    /// Whether `tag` is the canonical tag of `message`, in constant time.
    pub fn tag_matches(&self, message: &str, tag: &str) -> bool {
        let want = self.tag(message);
        want.len() == tag.len() && bool::from(want.as_bytes().ct_eq(tag.as_bytes()))
    }

    /// Whether `expires`/`signature` (query values) sign `file_key` and are unexpired at
    /// `now`. Only the exact canonical signature counts, compared in constant time.
    pub fn verify(&self, file_key: &str, expires: &str, signature: &str, now: Millis) -> bool {
        // The canonical decimal form too, so `expires` cannot be respelt either.
        let Some(exp) = expires
            .parse::<i64>()
            .ok()
            .filter(|e| e.to_string() == expires)
        else {
            return false;
        };
        if exp < now {
            return false;
        }
        self.tag_matches(&format!("{file_key}\n{exp}"), signature)
    }

    /// `<base>/files/<key>?expires=…&signature=…`.
    pub fn link(&self, public_url: &str, file_key: &str, expires: i64) -> String {
        let sig = self.signature(file_key, expires);
        let base = public_url.trim_end_matches('/');
        format!("{base}/files/{file_key}?expires={expires}&signature={sig}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_signature_counts() {
        let s = LinkSigner::from_key(b"k");
        let sig = s.signature("results/t/k/0.png", 5000);
        assert_eq!(sig.len(), 64);
        assert!(sig
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert!(s.verify("results/t/k/0.png", "5000", &sig, 4000));
        assert!(
            !s.verify("results/t/k/0.png", "5000", &sig, 5001),
            "expired"
        );
        assert!(!s.verify("results/t/k/0.png", "5000", &sig.to_uppercase(), 4000));
        assert!(!s.verify("results/t/k/0.png", "5000", "", 4000));
        assert!(!s.verify("results/t/k/0.png", "5000", &sig[..62], 4000));
        assert!(!s.verify("results/t/k/0.png", "05000", &sig, 4000));
        assert!(!s.verify("results/t/k/0.png", "+5000", &sig, 4000));
        assert!(!s.verify("results/t/k/1.png", "5000", &sig, 4000));
        assert!(!LinkSigner::from_key(b"other").verify("results/t/k/0.png", "5000", &sig, 4000));
    }
}
