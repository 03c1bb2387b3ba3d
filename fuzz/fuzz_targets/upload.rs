//! The upload parsers of `remixd_api::uploads` (through its `fuzzing` module):
//! `uploadPath`, the stored file name, `base64Data`, and the storage key of a URL of
//! this server, by any spelling (`remixd_store::blobs::classify_url`, which
//! `download-url`, the worker's own-file rule and private files all use). The input is four fields separated by NUL bytes: uploadPath, fileName,
//! base64Data and a URL. Nothing may panic; an accepted path and name must make a valid
//! storage key (the store refuses anything else), and decoded data must round-trip.

#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use remixd_api::uploads::fuzzing;
use remixd_domain::ServerOrigin;
use remixd_store::blobs::{classify_url, valid_key, FileUrl};

const PUBLIC_URL: &str = "http://127.0.0.1:8080/";

/// A safe path segment or file name: what `valid_key` allows in a segment.
fn safe(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fuzz_target!(|bytes: &[u8]| {
    let text = String::from_utf8_lossy(bytes);
    let mut fields = text.splitn(4, '\0');
    let path = fields.next().unwrap_or("");
    let name = fields.next();
    let data = fields.next().unwrap_or("");
    let url = fields.next().unwrap_or("");

    let accepted = fuzzing::upload_path(Some(path.to_string()));
    if let Ok(p) = &accepted {
        assert_eq!(p, path);
        assert!(p.len() <= 200 && p.split('/').all(safe), "{p:?}");
    }
    for ext in ["jpg", "png", "webp"] {
        let file = fuzzing::file_name(name, ext);
        assert!(
            safe(&file) && !file.starts_with('.'),
            "{name:?} gave {file:?}"
        );
        assert!(file.len() <= 120, "{file:?}");
        if let Ok(p) = &accepted {
            // As `store_upload` builds it, with 128 random bits in hex.
            let key = format!("uploads/{}/{p}/{file}", "0".repeat(32));
            assert!(key.len() > 512 || valid_key(&key), "{key:?}");
        }
    }

    if let Ok(decoded) = fuzzing::base64_data(data) {
        let encoded = base64::engine::general_purpose::STANDARD.encode(&decoded);
        assert_eq!(fuzzing::base64_data(&encoded).as_ref(), Ok(&decoded));
        let url = format!("data:image/png;base64,{encoded}");
        assert_eq!(fuzzing::base64_data(&url).as_ref(), Ok(&decoded));
    }

    let origin = ServerOrigin::new(PUBLIC_URL, None).expect("a valid public URL");
    if let FileUrl::File(key) = classify_url(&origin, url) {
        // Whatever the spelling, only a valid key under a public prefix comes out.
        assert!(valid_key(&key), "{url:?} gave {key:?}");
        assert!(
            key.starts_with("uploads/") || key.starts_with("results/"),
            "{url:?} gave {key:?}"
        );
    }
});
