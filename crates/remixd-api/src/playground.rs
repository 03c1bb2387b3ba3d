//! The playground: a web page to try remixes (`GET /` and `/playground`), embedded in the
//! binary and served from memory, so it works offline and needs no toolchain to build.
//!
//! The page is plain HTML, CSS and JavaScript (`playground/`): a form over the same
//! public API a client uses (uploads, createTask, the SSE stream, the task list), with the
//! API key kept in the browser's local storage and sent only in the `Authorization`
//! header, never in a URL. Every response here carries a strict Content-Security-Policy
//! (no inline script or style, no other origin but the bucket's when files are
//! presigned), `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.
//! `server.playground = false` takes the routes away (404 like any unknown path).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use remixd_domain::input::{NEGATIVE_PROMPT_MAX_CHARS, PROMPT_MAX_CHARS};
use remixd_domain::ImageSize;
use serde_json::{json, Value};

use crate::AppState;

const INDEX: &str = include_str!("../playground/index.html");
const SCRIPT: &str = include_str!("../playground/app.js");
const STYLE: &str = include_str!("../playground/app.css");

/// The playground's routes, added to the router when `server.playground` is on.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/playground", get(index))
        .route("/playground/app.js", get(script))
        .route("/playground/app.css", get(style))
        .route("/playground/config.json", get(config))
}

/// The Content-Security-Policy of the playground's responses: only this origin's
/// scripts, styles, connections and images (and `blob:` previews of files about to be
/// uploaded); the bucket's origin for images when results are presigned links.
pub fn content_security_policy(image_origin: Option<&str>) -> String {
    let extra = image_origin.map(|o| format!(" {o}")).unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:{extra}; \
         connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
}

fn page(state: &AppState, content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure(state, h);
    resp
}

/// The security headers every playground response carries.
fn secure(state: &AppState, h: &mut axum::http::HeaderMap) {
    let csp = content_security_policy(state.cfg.presigned_origin.as_deref());
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

async fn index(State(state): State<Arc<AppState>>) -> Response {
    page(&state, "text/html; charset=utf-8", INDEX)
}

async fn script(State(state): State<Arc<AppState>>) -> Response {
    page(&state, "text/javascript; charset=utf-8", SCRIPT)
}

async fn style(State(state): State<Arc<AppState>>) -> Response {
    page(&state, "text/css; charset=utf-8", STYLE)
}

/// What the page needs to know of this server: prices, sizes, limits.
pub fn config_document(state: &AppState) -> Value {
    let p = &state.cfg.prices;
    let sizes: Vec<Value> = ImageSize::ALL
        .iter()
        .map(|s| {
            let (w, h) = s.dimensions();
            json!({"name": s.as_str(), "width": w, "height": h})
        })
        .collect();
    json!({
        "prices": {"TURBO": p.turbo, "BALANCED": p.balanced, "QUALITY": p.quality},
        "sizes": sizes,
        "promptMaxChars": PROMPT_MAX_CHARS,
        "negativePromptMaxChars": NEGATIVE_PROMPT_MAX_CHARS,
        "maxUploadBytes": state.cfg.max_upload_bytes,
        "model": remixd_domain::MODEL_NAME,
    })
}

async fn config(State(state): State<Arc<AppState>>) -> Response {
    let mut resp = Json(config_document(&state)).into_response();
    secure(&state, resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_nothing_inline_and_no_other_origin() {
        let csp = content_security_policy(None);
        assert!(csp.contains("script-src 'self';") && csp.contains("style-src 'self';"));
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
        assert!(csp.contains("img-src 'self' blob:;"), "{csp}");
        let with_bucket = content_security_policy(Some("https://bucket.example:9000"));
        assert!(
            with_bucket.contains("img-src 'self' blob: https://bucket.example:9000;"),
            "{with_bucket}"
        );
    }

    #[test]
    fn the_page_loads_no_inline_script_or_style_and_nothing_from_elsewhere() {
        assert!(INDEX.contains(r#"<script src="/playground/app.js" defer></script>"#));
        for inline in [
            "<script>",
            "<style",
            " style=\"",
            "onclick=",
            "onload=",
            "javascript:",
        ] {
            assert!(!INDEX.contains(inline), "{inline}");
        }
        // Nothing is loaded from another origin: no absolute URL in a src, href, url()
        // or import, and no literal origin in the script.
        for far in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
            assert!(!INDEX.contains(far), "{far}");
        }
        for far in ["url(", "@import"] {
            assert!(!STYLE.contains(far), "{far}");
        }
        for far in ["http://", "https://", "import("] {
            assert!(!SCRIPT.contains(far), "{far}");
        }
    }
}
