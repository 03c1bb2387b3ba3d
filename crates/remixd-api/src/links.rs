//! Signed links to this server's files, and the ownership rule for its file URLs.
//!
//! A plain result or upload URL (`<public_url>/files/<key>`) is a capability: anyone
//! holding it can read the file until it expires. A signed link adds
//! `?expires=<unix ms>&signature=<hex HMAC-SHA256 of "key\nexpires">`, keyed by a secret
//! kept in the database (`server_values`), so every node agrees on it. With
//! `storage.private_files`, plain URLs answer 404 and every answer that shows a task's
//! results (recordInfo, cancel, the SSE stream, callbacks) signs the stored plain URLs
//! at answer time; the stored `resultJson` keeps the plain ones.
//!
//! A signature counts only in its canonical form (64 lower-case hex digits), compared in
//! constant time: an upper-cased or missing signature is not a signed link.

use remixd_domain::{ServerOrigin, TaskId};
use remixd_store::blobs::{classify_url, result_task, FileUrl};
use remixd_store::{StoreError, TaskRecord};
use serde_json::Value;

use crate::wire::RecordInfo;
use crate::AppState;

/// How long a link from `download-url`, recordInfo, cancel or the stream lives.
pub const DOWNLOAD_LINK_MS: i64 = 20 * 60 * 1000;

/// How long a link in a callback body lives: the body is fixed at the first attempt and
/// retries run for about 16 hours, so its links must outlive them.
pub const CALLBACK_LINK_MS: i64 = 24 * 3_600_000;

pub use remixd_store::links::LinkSigner;

/// How answers show result URLs: as stored (plain), or signed (`storage.private_files`).
#[derive(Debug, Clone)]
pub struct AnswerLinks {
    signed: Option<SignedAnswers>,
}

#[derive(Debug, Clone)]
struct SignedAnswers {
    signer: LinkSigner,
    origin: ServerOrigin,
    public_url: String,
    expires: i64,
}

impl AnswerLinks {
    /// Plain URLs, as stored.
    pub fn plain() -> Self {
        Self { signed: None }
    }

    /// Links signed with `signer`, valid until `expires`, for the URLs of `origin`.
    pub fn signed(
        signer: LinkSigner,
        origin: ServerOrigin,
        public_url: &str,
        expires: i64,
    ) -> Self {
        Self {
            signed: Some(SignedAnswers {
                signer,
                origin,
                public_url: public_url.to_string(),
                expires,
            }),
        }
    }

    /// What an answer made now by this API shows.
    pub async fn for_answer(state: &AppState) -> Result<Self, StoreError> {
        if !state.cfg.private_files {
            return Ok(Self::plain());
        }
        let Some(origin) = origin(state) else {
            return Ok(Self::plain());
        };
        let signer = state.link_signer().await?;
        let expires = remixd_domain::now_millis() + DOWNLOAD_LINK_MS;
        Ok(Self::signed(signer, origin, &state.cfg.public_url, expires))
    }

    /// A stored `resultJson` with its file URLs (`resultUrls` and `images[].url`) signed;
    /// unchanged when links are plain or it is not a result document.
    pub fn result_json(&self, stored: &str) -> String {
        let Some(s) = &self.signed else {
            return stored.to_string();
        };
        let Ok(mut doc) = serde_json::from_str::<Value>(stored) else {
            return stored.to_string();
        };
        let sign = |v: &mut Value| {
            if let Some(FileUrl::File(key)) = v.as_str().map(|u| classify_url(&s.origin, u)) {
                *v = Value::String(s.signer.link(&s.public_url, &key, s.expires));
            }
        };
        if let Some(urls) = doc.get_mut("resultUrls").and_then(Value::as_array_mut) {
            urls.iter_mut().for_each(sign);
        }
        if let Some(images) = doc.get_mut("images").and_then(Value::as_array_mut) {
            for img in images {
                if let Some(u) = img.get_mut("url") {
                    sign(u);
                }
            }
        }
        serde_json::to_string(&doc).unwrap_or_else(|_| stored.to_string())
    }

    /// The recordInfo object of a task, its result URLs shown as these links say.
    pub fn record(&self, task: TaskRecord) -> RecordInfo {
        let mut r = RecordInfo::from(task);
        if self.signed.is_some() && !r.result_json.is_empty() {
            r.result_json = self.result_json(&r.result_json);
        }
        r
    }
}

/// This server as its URLs name it: the fetcher's origin (which knows the listen
/// address), or one made from `public_url`.
pub fn origin(state: &AppState) -> Option<ServerOrigin> {
    state
        .fetcher
        .config()
        .origin
        .clone()
        .or_else(|| ServerOrigin::new(&state.cfg.public_url, None).ok())
}

/// Whether `account_id` may use this server's file `key`: an unexpired upload of that
/// account, or an existing result of one of its tasks.
pub async fn account_may_use(
    state: &AppState,
    account_id: &str,
    key: &str,
) -> Result<bool, StoreError> {
    if key.starts_with("uploads/") {
        return Ok(state.store.upload(key).await?.is_some_and(|up| {
            up.account_id == account_id && up.expire_time >= remixd_domain::now_millis()
        }));
    }
    let Some(task) = result_task(key).and_then(|t| t.parse::<TaskId>().ok()) else {
        return Ok(false);
    };
    if state.store.get_task(&task, account_id).await?.is_none() {
        return Ok(false);
    }
    Ok(state.blobs.get(key).await.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_json_is_signed_at_answer_time() {
        let origin = ServerOrigin::new("http://127.0.0.1:8080", None).unwrap();
        let signer = LinkSigner::from_key(b"k");
        let stored = r#"{"resultUrls":["http://127.0.0.1:8080/files/results/t/k/0.png"],"seed":3,"images":[{"url":"http://127.0.0.1:8080/files/results/t/k/0.png","width":1}]}"#;
        let links = AnswerLinks::signed(signer.clone(), origin, "http://127.0.0.1:8080", 9000);
        let out: Value = serde_json::from_str(&links.result_json(stored)).unwrap();
        let want = signer.link("http://127.0.0.1:8080", "results/t/k/0.png", 9000);
        assert_eq!(out["resultUrls"][0], want.as_str());
        assert_eq!(out["images"][0]["url"], want.as_str());
        assert_eq!(
            (out["seed"].as_i64(), out["images"][0]["width"].as_i64()),
            (Some(3), Some(1))
        );
        assert_eq!(AnswerLinks::plain().result_json(stored), stored);
        assert_eq!(links.result_json(""), "");
    }
}
