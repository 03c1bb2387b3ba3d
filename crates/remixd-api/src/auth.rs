//! API keys: generation, hashing, and the `Authorization: Bearer` check.
//!
//! A key is looked up by its public id and then compared by SHA-256 in constant time
//! (`subtle`), so neither the lookup nor the comparison leaks how much of a guess was
//! right. Keys carry 256 random bits; a slow password hash would add nothing.

use axum::http::HeaderMap;
use rand::RngCore;
use remixd_domain::{ApiKeyToken, KeyLimits};
use remixd_store::{ApiKeyRecord, NewKey, Store};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub account_id: String,
}

/// SHA-256 of a whole key.
pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A fresh key and the record to store for it. The key is shown once and never stored.
pub fn generate_key(account_name: &str, label: &str, limits: KeyLimits) -> (ApiKeyToken, NewKey) {
    let mut rng = rand::thread_rng();
    let mut id = [0u8; 8];
    rng.fill_bytes(&mut id);
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let token = ApiKeyToken::assemble(&key_id, &secret);
    let record = NewKey {
        id: key_id,
        account_name: account_name.to_string(),
        label: label.to_string(),
        key_hash: hash_key(&token.0),
        limits,
    };
    (token, record)
}

/// Whether a stored key matches a presented one (constant time in the hash).
pub fn key_matches(record: &ApiKeyRecord, presented: &str) -> bool {
    let h = hash_key(presented);
    record.key_hash.len() == h.len() && bool::from(record.key_hash.ct_eq(&h))
}

/// Authenticates a request by its `Authorization` header.
pub async fn authenticate(store: &dyn Store, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let raw = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::Unauthorized("Authorization header with a Bearer API key is required".into())
        })?;
    let raw = raw
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization must be 'Bearer <key>'".into()))?;
    let (scheme, key) = raw
        .trim()
        .split_once(' ')
        .ok_or_else(|| ApiError::Unauthorized("Authorization must be 'Bearer <key>'".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::Unauthorized(
            "Authorization must be 'Bearer <key>'".into(),
        ));
    }
    let invalid = || ApiError::Unauthorized("invalid or revoked API key".into());
    let token = ApiKeyToken(key.trim().to_string());
    let parsed = token.parse().ok_or_else(invalid)?;
    let record = store.key_by_id(&parsed.key_id).await?.ok_or_else(invalid)?;
    if record.revoke_time.is_some() || !key_matches(&record, &token.0) {
        return Err(invalid());
    }
    Ok(Caller {
        key_id: record.id,
        account_id: record.account_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match_only_themselves() {
        let (k, rec) = generate_key("default", "", KeyLimits::default());
        let (k2, _) = generate_key("default", "", KeyLimits::default());
        assert_ne!(k, k2);
        assert_eq!(k.parse().unwrap().key_id, rec.id);
        let stored = ApiKeyRecord {
            id: rec.id.clone(),
            account_id: "a".into(),
            account_name: "default".into(),
            label: String::new(),
            key_hash: rec.key_hash.clone(),
            limits: KeyLimits::default(),
            create_time: 0,
            revoke_time: None,
        };
        assert!(key_matches(&stored, &k.0));
        assert!(!key_matches(&stored, &k2.0));
        let mut tampered = k.0.clone();
        tampered.pop();
        tampered.push('0');
        assert!(tampered == k.0 || !key_matches(&stored, &tampered));
    }
}
