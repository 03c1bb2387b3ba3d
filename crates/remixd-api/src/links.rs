//! Links to this server's files in its answers, and the ownership rule for its file URLs.
//!
//! A plain result or upload URL (`<public_url>/files/<key>`) is a capability: anyone
//! holding it can read the file until it expires. A signed link adds
//! `?expires=<unix ms>&signature=<hex HMAC-SHA256 of "key\nexpires">`, keyed by a secret
//! kept in the database (`server_values`), so every node agrees on it. With
//! `storage.private_files`, plain URLs answer 404 and every answer that shows a task's
//! results (recordInfo, cancel, the SSE stream, callbacks) signs the stored plain URLs
//! at answer time; the stored `resultJson` keeps the plain ones.
//!
//! With `storage.public = "presigned"` (files in a bucket), those answers and
//! `download-url` hand out presigned bucket URLs instead, so clients read the files from
//! the bucket and not through an API node. Presigning is asynchronous (the bucket's
//! credentials may have to be fetched), so every answer's links are made in an async
//! step before it is written. A URL that cannot be presigned is shown as it would be
//! without presigning (signed or plain), with a warning: the answer is never lost.
//!
//! A signature counts only in its canonical form (64 lower-case hex digits), compared in
//! constant time: an upper-cased or missing signature is not a signed link.

use std::time::Duration;

use remixd_domain::{ServerOrigin, TaskId};
use remixd_store::blobs::{classify_url, result_task, Blobs, FileUrl};
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

/// How answers show result URLs: as stored (plain), signed by this server
/// (`storage.private_files`), or presigned by the bucket (`storage.public = "presigned"`).
#[derive(Debug, Clone)]
pub struct AnswerLinks {
    /// This server, as its file URLs name it; `None`: URLs are shown as stored.
    origin: Option<ServerOrigin>,
    signed: Option<SignedAnswers>,
    presigned: Option<PresignedAnswers>,
}

#[derive(Debug, Clone)]
struct SignedAnswers {
    signer: LinkSigner,
    public_url: String,
    expires: i64,
}

#[derive(Debug, Clone)]
struct PresignedAnswers {
    blobs: Blobs,
    expires_in: Duration,
}

impl AnswerLinks {
    /// Plain URLs, as stored.
    pub fn plain() -> Self {
        Self {
            origin: None,
            signed: None,
            presigned: None,
        }
    }

    /// Links signed with `signer`, valid until `expires`, for the URLs of `origin`.
    pub fn signed(
        signer: LinkSigner,
        origin: ServerOrigin,
        public_url: &str,
        expires: i64,
    ) -> Self {
        Self {
            origin: Some(origin),
            signed: Some(SignedAnswers {
                signer,
                public_url: public_url.to_string(),
                expires,
            }),
            presigned: None,
        }
    }

    /// These links, but the files of `origin` presigned by the bucket of `blobs` for
    /// `expires_in`; a file the bucket cannot sign is shown as these links show it.
    pub fn presigned_by(self, blobs: Blobs, origin: ServerOrigin, expires_in: Duration) -> Self {
        Self {
            origin: Some(origin),
            presigned: Some(PresignedAnswers { blobs, expires_in }),
            ..self
        }
    }

    /// What an answer made now by this API shows.
    pub async fn for_answer(state: &AppState) -> Result<Self, StoreError> {
        let Some(origin) = origin(state) else {
            return Ok(Self::plain());
        };
        let mut links = Self::plain();
        if state.cfg.private_files {
            let signer = state.link_signer().await?;
            let expires = remixd_domain::now_millis() + DOWNLOAD_LINK_MS;
            links = Self::signed(signer, origin.clone(), &state.cfg.public_url, expires);
        }
        if state.cfg.presigned_links {
            let lasting = Duration::from_millis(DOWNLOAD_LINK_MS as u64);
            links = links.presigned_by(state.blobs.clone(), origin, lasting);
        }
        Ok(links)
    }

    /// The link for the file `key`: presigned, signed, or `None` (shown as stored).
    async fn key_link(&self, key: &str) -> Option<String> {
        if let Some(p) = &self.presigned {
            match p.blobs.presigned_get(key, p.expires_in).await {
                Ok(Some(link)) => return Some(link.to_string()),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    key,
                    error = %e,
                    "cannot presign a file URL; answering with this server's link"
                ),
            }
        }
        let s = self.signed.as_ref()?;
        Some(s.signer.link(&s.public_url, key, s.expires))
    }

    /// The link an answer shows for `url`; `None` when it is not one of this server's
    /// files, or when these links show URLs as stored.
    pub async fn file_link(&self, url: &str) -> Option<String> {
        match classify_url(self.origin.as_ref()?, url) {
            FileUrl::File(key) => self.key_link(&key).await,
            FileUrl::Foreign | FileUrl::NotAFile => None,
        }
    }

    /// A stored `resultJson` with its file URLs (`resultUrls` and `images[].url`) shown
    /// as these links say; unchanged when links are plain or it is not a result document.
    pub async fn result_json(&self, stored: &str) -> String {
        if self.origin.is_none() {
            return stored.to_string();
        }
        let Ok(mut doc) = serde_json::from_str::<Value>(stored) else {
            return stored.to_string();
        };
        let mut urls: Vec<&mut Value> = Vec::new();
        for (field, v) in doc.as_object_mut().into_iter().flatten() {
            let Some(list) = v.as_array_mut() else {
                continue;
            };
            match field.as_str() {
                "resultUrls" => urls.extend(list.iter_mut()),
                "images" => urls.extend(list.iter_mut().filter_map(|img| img.get_mut("url"))),
                _ => {}
            }
        }
        for v in urls {
            let Some(url) = v.as_str() else { continue };
            if let Some(link) = self.file_link(url).await {
                *v = Value::String(link);
            }
        }
        serde_json::to_string(&doc).unwrap_or_else(|_| stored.to_string())
    }

    /// The recordInfo object of a task, its result URLs shown as these links say.
    pub async fn record(&self, task: TaskRecord) -> RecordInfo {
        let mut r = RecordInfo::from(task);
        if !r.result_json.is_empty() {
            r.result_json = self.result_json(&r.result_json).await;
        }
        r
    }
}

/// The link `download-url` answers for one of this server's files, valid
/// [`DOWNLOAD_LINK_MS`]: presigned by the bucket under `storage.public = "presigned"`,
/// else signed by this server.
pub async fn download_link(state: &AppState, file_key: &str) -> Result<String, StoreError> {
    let signer = state.link_signer().await?;
    let expires = remixd_domain::now_millis() + DOWNLOAD_LINK_MS;
    let signed = signer.link(&state.cfg.public_url, file_key, expires);
    let Some(origin) = origin(state).filter(|_| state.cfg.presigned_links) else {
        return Ok(signed);
    };
    let lasting = Duration::from_millis(DOWNLOAD_LINK_MS as u64);
    let links = AnswerLinks::signed(signer, origin.clone(), &state.cfg.public_url, expires)
        .presigned_by(state.blobs.clone(), origin, lasting);
    Ok(links.key_link(file_key).await.unwrap_or(signed))
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

    #[tokio::test]
    async fn result_json_is_signed_at_answer_time() {
        let origin = ServerOrigin::new("http://127.0.0.1:8080", None).unwrap();
        let signer = LinkSigner::from_key(b"k");
        let stored = r#"{"resultUrls":["http://127.0.0.1:8080/files/results/t/k/0.png"],"seed":3,"images":[{"url":"http://127.0.0.1:8080/files/results/t/k/0.png","width":1}]}"#;
        let links = AnswerLinks::signed(signer.clone(), origin, "http://127.0.0.1:8080", 9000);
        let out: Value = serde_json::from_str(&links.result_json(stored).await).unwrap();
        let want = signer.link("http://127.0.0.1:8080", "results/t/k/0.png", 9000);
        assert_eq!(out["resultUrls"][0], want.as_str());
        assert_eq!(out["images"][0]["url"], want.as_str());
        assert_eq!(
            (out["seed"].as_i64(), out["images"][0]["width"].as_i64()),
            (Some(3), Some(1))
        );
        assert_eq!(AnswerLinks::plain().result_json(stored).await, stored);
        assert_eq!(links.result_json("").await, "");
    }
}
