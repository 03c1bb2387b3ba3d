//! File uploads (API.md §6) and signed download links (§5): the three forms round-trip
//! bytes exactly, errors answer in the upload envelope, and an uploaded file works as a
//! task input without an HTTP round trip.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::TestServer;
use remixd_testkit::{samples, ImageServer};
use serde_json::{json, Value};

async fn multipart(srv: &TestServer, key: &str, form: reqwest::multipart::Form) -> (u16, Value) {
    let r = srv
        .api
        .http
        .post(format!("{}/api/file-stream-upload", srv.api.base))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn json_upload(srv: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let r = srv
        .api
        .http
        .post(format!("{}{path}", srv.api.base))
        .bearer_auth(&srv.api.key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn file_part(bytes: &[u8], name: &str, claimed: &str) -> reqwest::multipart::Part {
    reqwest::multipart::Part::bytes(bytes.to_vec())
        .file_name(name.to_string())
        .mime_str(claimed)
        .unwrap()
}

async fn download(url: &str) -> (u16, Vec<u8>, String) {
    let r = reqwest::get(url).await.unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec(), ct)
}

fn check_shape(v: &Value, size: usize, mime: &str) -> String {
    assert_eq!(
        (
            v["success"].as_bool(),
            v["code"].as_i64(),
            v["msg"].as_str()
        ),
        (Some(true), Some(200), Some("File uploaded successfully")),
        "{v}"
    );
    let d = &v["data"];
    assert_eq!(d["fileSize"].as_u64(), Some(size as u64));
    assert_eq!(d["mimeType"], mime);
    let at = d["uploadedAt"].as_str().unwrap();
    assert!(
        at.len() == 24
            && at.ends_with('Z')
            && at.as_bytes()[10] == b'T'
            && at.as_bytes()[19] == b'.',
        "{at}"
    );
    assert!(d["filePath"]
        .as_str()
        .unwrap()
        .ends_with(d["fileName"].as_str().unwrap()));
    d["downloadUrl"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn the_three_forms_round_trip_bytes_exactly() {
    let srv = TestServer::start().await;
    let png = samples::ASTRONAUT_MASK_PNG;
    // Stream: the client's claimed type is ignored; the bytes say PNG.
    let form = reqwest::multipart::Form::new()
        .part("file", file_part(png, "mask.png", "text/plain"))
        .text("uploadPath", "images/user-uploads");
    let (status, v) = multipart(&srv, &srv.api.key, form).await;
    assert_eq!(status, 200);
    let url = check_shape(&v, png.len(), "image/png");
    assert_eq!(v["data"]["filePath"], "images/user-uploads/mask.png");
    let (s, bytes, ct) = download(&url).await;
    assert_eq!((s, ct.as_str()), (200, "image/png"));
    assert_eq!(bytes, png);

    // Base64, as a data URL and plain, with a fileName.
    let webp = samples::COFFEE_WEBP;
    let b64 = base64::engine::general_purpose::STANDARD.encode(webp);
    for data in [format!("data:image/jpeg;base64,{b64}"), b64.clone()] {
        let (status, v) = json_upload(
            &srv,
            "/api/file-base64-upload",
            json!({"base64Data": data, "uploadPath": "b64", "fileName": "cup.webp"}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let url = check_shape(&v, webp.len(), "image/webp");
        assert_eq!(v["data"]["fileName"], "cup.webp");
        assert_eq!(download(&url).await.1, webp);
    }

    // URL, from a loopback server that fetch.allow admits.
    let img = ImageServer::start().await;
    let (status, v) = json_upload(
        &srv,
        "/api/file-url-upload",
        json!({"fileUrl": img.url("astronaut.webp"), "uploadPath": "from-url"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let url = check_shape(&v, samples::ASTRONAUT_WEBP.len(), "image/webp");
    assert_eq!(v["data"]["fileName"], "astronaut.webp");
    assert_eq!(download(&url).await.1, samples::ASTRONAUT_WEBP);
    srv.stop().await;
}

#[tokio::test]
async fn upload_errors_answer_in_the_upload_envelope() {
    let srv = TestServer::start_with(|s| s.fetch.max_image_bytes = 100_000).await;
    let expect = |(status, v): (u16, Value), code: u16, msg: &str| {
        assert_eq!(status, code, "{v}");
        assert_eq!(
            (v["success"].as_bool(), v["code"].as_u64()),
            (Some(false), Some(code as u64)),
            "{v}"
        );
        assert!(
            v["msg"].as_str().unwrap().contains(msg),
            "{v} should say {msg:?}"
        );
    };
    let big = samples::png(400, 400, [1, 2, 3]);
    let noisy: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut too_big = b"\x89PNG\r\n\x1a\n".to_vec();
    too_big.extend_from_slice(&noisy);
    assert!(big.len() < 100_000);

    let form = reqwest::multipart::Form::new()
        .part("file", file_part(&too_big, "x.png", "image/png"))
        .text("uploadPath", "p");
    expect(
        multipart(&srv, &srv.api.key, form).await,
        413,
        "larger than the limit",
    );
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            file_part(b"%PDF-1.4 not an image", "x.pdf", "image/png"),
        )
        .text("uploadPath", "p");
    expect(
        multipart(&srv, &srv.api.key, form).await,
        400,
        "only JPEG, PNG and WebP",
    );
    let form = reqwest::multipart::Form::new().part("file", file_part(&big, "x.png", "image/png"));
    expect(
        multipart(&srv, &srv.api.key, form).await,
        400,
        "Missing required parameter: uploadPath",
    );
    let form = reqwest::multipart::Form::new()
        .part("file", file_part(&big, "x.png", "image/png"))
        .text("uploadPath", "/lead");
    expect(multipart(&srv, &srv.api.key, form).await, 400, "slash");
    let form = reqwest::multipart::Form::new().text("uploadPath", "p");
    expect(
        multipart(&srv, &srv.api.key, form).await,
        400,
        "Missing required parameter: file",
    );
    let form = reqwest::multipart::Form::new()
        .part("file", file_part(&big, "x.png", "image/png"))
        .text("uploadPath", "p");
    expect(multipart(&srv, "rmx_nope", form).await, 401, "");

    expect(
        json_upload(
            &srv,
            "/api/file-base64-upload",
            json!({"base64Data": "!!!not base64", "uploadPath": "p"}),
        )
        .await,
        400,
        "not valid base64",
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&too_big);
    expect(
        json_upload(
            &srv,
            "/api/file-base64-upload",
            json!({"base64Data": b64, "uploadPath": "p"}),
        )
        .await,
        413,
        "larger than the limit",
    );
    expect(
        json_upload(
            &srv,
            "/api/file-base64-upload",
            json!({"base64Data": "aGk="}),
        )
        .await,
        400,
        "Missing required parameter: uploadPath",
    );
    expect(
        json_upload(&srv, "/api/file-url-upload", json!({"uploadPath": "p"})).await,
        400,
        "Missing required parameter: fileUrl",
    );
    expect(
        json_upload(
            &srv,
            "/api/file-url-upload",
            json!({"fileUrl": "http://127.0.0.1:9/x.png", "uploadPath": "p"}),
        )
        .await,
        400,
        "unreachable",
    );
    srv.stop().await;

    // Without fetch.allow, a loopback fileUrl is refused before any request.
    let srv = TestServer::start_with(|s| s.fetch.allow.clear()).await;
    let img = ImageServer::start().await;
    expect(
        json_upload(
            &srv,
            "/api/file-url-upload",
            json!({"fileUrl": img.url("coffee.webp"), "uploadPath": "p"}),
        )
        .await,
        400,
        "blocked",
    );
    assert_eq!(img.hits(), 0);
    srv.stop().await;
}

#[tokio::test]
async fn an_upload_is_a_task_input_read_from_storage() {
    // fetch.allow is empty: an HTTP fetch of the server's own loopback URL would be
    // refused, so success proves the worker read the uploads from storage.
    let srv = TestServer::start_with(|s| s.fetch.allow.clear()).await;
    let mut urls = Vec::new();
    for (bytes, name) in [
        (samples::COFFEE_WEBP, "base.webp"),
        (samples::ASTRONAUT_WEBP, "character.webp"),
    ] {
        let form = reqwest::multipart::Form::new()
            .part("file", file_part(bytes, name, "application/octet-stream"))
            .text("uploadPath", "inputs");
        let (status, v) = multipart(&srv, &srv.api.key, form).await;
        assert_eq!(status, 200);
        urls.push(v["data"]["downloadUrl"].as_str().unwrap().to_string());
    }
    let id = srv
        .api
        .create_ok(&remixd_testkit::task_body(&urls[0], &urls[1], json!({})))
        .await;
    let d = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "success", "{d}");

    // Another account cannot use them.
    let other = srv.account("other", 100, Default::default()).await;
    let id = other
        .create_ok(&remixd_testkit::task_body(&urls[0], &urls[1], json!({})))
        .await;
    let d = other.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(d["failCode"], "422");
    assert!(
        d["failMsg"]
            .as_str()
            .unwrap()
            .contains("does not exist or has expired"),
        "{d}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn download_url_signs_20_minute_links_to_our_own_files_only() {
    let srv = TestServer::start().await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(samples::ASTRONAUT_MASK_PNG);
    let (_, v) = json_upload(
        &srv,
        "/api/file-base64-upload",
        json!({"base64Data": b64, "uploadPath": "share"}),
    )
    .await;
    let url = v["data"]["downloadUrl"].as_str().unwrap().to_string();
    let a = srv
        .api
        .post_raw(
            "/api/v1/common/download-url",
            "application/json",
            json!({"url": url}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(a.code(), 200, "{:?}", a.body);
    let link = a.body["data"].as_str().unwrap().to_string();
    assert!(link.starts_with(&url) && link.contains("expires=") && link.contains("signature="));
    let expires: i64 = link
        .split("expires=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let minutes = (expires - remixd_domain::now_millis()) as f64 / 60_000.0;
    assert!((19.9..=20.0).contains(&minutes), "{minutes}");
    let (s, bytes, _) = download(&link).await;
    assert_eq!((s, bytes.as_slice()), (200, samples::ASTRONAUT_MASK_PNG));
    let tampered = format!("{}0", &link[..link.len() - 1]);
    let tampered = if tampered == link {
        format!("{}1", &link[..link.len() - 1])
    } else {
        tampered
    };
    assert_eq!(download(&tampered).await.0, 404);
    let extended = link.replace(
        &format!("expires={expires}"),
        &format!("expires={}", expires + 3_600_000),
    );
    assert_eq!(download(&extended).await.0, 404, "the expiry is signed");

    for foreign in [
        "https://example.com/files/uploads/a/b.png",
        &format!("{}/files/inputs/x/base", srv.api.base),
        &format!("{}/files/uploads/00/none.png", srv.api.base),
    ] {
        let a = srv
            .api
            .post_raw(
                "/api/v1/common/download-url",
                "application/json",
                json!({"url": foreign}).to_string().into_bytes(),
            )
            .await;
        assert_eq!(a.code(), 422, "{foreign}");
    }
    srv.stop().await;
}

/// An upload's status, body and `Retry-After`, from the base64 form.
async fn b64_upload(srv: &TestServer, key: &str, bytes: &[u8]) -> (u16, Value, Option<String>) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let r = srv
        .api
        .http
        .post(format!("{}/api/file-base64-upload", srv.api.base))
        .bearer_auth(key)
        .json(&json!({"base64Data": b64, "uploadPath": "q"}))
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), r.json().await.unwrap(), retry)
}

fn assert_refused(got: &(u16, Value, Option<String>), code: u16, msg: &str) {
    let (status, v, _) = got;
    assert_eq!(*status, code, "{v}");
    assert_eq!(
        (v["success"].as_bool(), v["code"].as_u64()),
        (Some(false), Some(code as u64)),
        "{v}"
    );
    assert!(
        v["msg"].as_str().unwrap().contains(msg),
        "{v} should say {msg:?}"
    );
}

#[tokio::test]
async fn uploads_are_rate_limited_per_account() {
    let srv = TestServer::start_with(|s| s.limits.uploads_per_10s = 2).await;
    let png = samples::ASTRONAUT_MASK_PNG;
    for _ in 0..2 {
        assert_eq!(b64_upload(&srv, &srv.api.key, png).await.0, 200);
    }
    let refused = b64_upload(&srv, &srv.api.key, png).await;
    assert_refused(&refused, 429, "at most 2 every 10 seconds");
    let wait: u64 = refused.2.expect("Retry-After").parse().unwrap();
    assert!((1..=10).contains(&wait), "{wait}");
    // Other accounts have their own allowance.
    let other = srv.account("other", 0, Default::default()).await;
    assert_eq!(b64_upload(&srv, &other.key, png).await.0, 200);
    srv.stop().await;
}

#[tokio::test]
async fn an_account_s_stored_uploads_stay_within_its_quota() {
    let png = samples::ASTRONAUT_MASK_PNG;
    let size = png.len() as u64;
    let srv = TestServer::start_with(|s| {
        s.fetch.max_image_bytes = size;
        s.limits.upload_quota_bytes = 2 * size + size / 2;
        s.retention.uploads_hours = 3.0 / 3600.0;
    })
    .await;
    assert_eq!(b64_upload(&srv, &srv.api.key, png).await.0, 200);
    assert_eq!(b64_upload(&srv, &srv.api.key, png).await.0, 200);
    let third = b64_upload(&srv, &srv.api.key, png).await;
    assert_refused(
        &third,
        413,
        &format!("quota of {} bytes", 2 * size + size / 2),
    );
    // The stream form is refused the same way.
    let form = reqwest::multipart::Form::new()
        .part("file", file_part(png, "m.png", "image/png"))
        .text("uploadPath", "q");
    let (status, v) = multipart(&srv, &srv.api.key, form).await;
    assert_eq!((status, v["code"].as_u64()), (413, Some(413)), "{v}");
    // Another account has its own quota.
    let other = srv.account("other", 0, Default::default()).await;
    assert_eq!(b64_upload(&srv, &other.key, png).await.0, 200);
    // Expired uploads free their room (before the sweeper deletes them).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, v, _) = b64_upload(&srv, &srv.api.key, png).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 413, "{v}");
        assert!(
            std::time::Instant::now() < deadline,
            "the quota never freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn uploads_in_flight_are_capped_per_account_and_in_all() {
    let srv = TestServer::start_with(|s| {
        s.limits.uploads_in_flight_per_account = 1;
        s.limits.uploads_in_flight = 2;
    })
    .await;
    let img = ImageServer::start().await;
    let other = srv.account("other", 0, Default::default()).await;
    let third = srv.account("third", 0, Default::default()).await;
    let slow = |key: String| {
        let (http, base, url) = (
            srv.api.http.clone(),
            srv.api.base.clone(),
            img.url("slow/1500"),
        );
        tokio::spawn(async move {
            http.post(format!("{base}/api/file-url-upload"))
                .bearer_auth(key)
                .json(&json!({"fileUrl": url, "uploadPath": "slow"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let wait_hits = |n: usize| {
        let img = img.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while img.hits() < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no request reached the image server"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let png = samples::ASTRONAUT_MASK_PNG;
    let first = slow(srv.api.key.clone());
    wait_hits(1).await;
    assert_refused(
        &b64_upload(&srv, &srv.api.key, png).await,
        429,
        "already has 1 uploads in progress",
    );
    let second = slow(other.key.clone());
    wait_hits(2).await;
    let full = b64_upload(&srv, &third.key, png).await;
    assert_refused(
        &full,
        429,
        "the server is handling its most uploads at once (2)",
    );
    assert_eq!(full.2.as_deref(), Some("1"));
    assert_eq!((first.await.unwrap(), second.await.unwrap()), (200, 200));
    // The slots came back.
    assert_eq!(b64_upload(&srv, &srv.api.key, png).await.0, 200);
    assert_eq!(b64_upload(&srv, &third.key, png).await.0, 200);
    srv.stop().await;
}

#[tokio::test]
async fn truncated_uploads_are_refused_naming_the_field() {
    let srv = TestServer::start().await;
    let jpeg = samples::jpeg(64, 48);
    let cut = &jpeg[..jpeg.len() * 2 / 3];
    let form = reqwest::multipart::Form::new()
        .part("file", file_part(cut, "cut.jpg", "image/jpeg"))
        .text("uploadPath", "p");
    let (status, v) = multipart(&srv, &srv.api.key, form).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["msg"],
        "file is truncated: the JPEG data ends before its end-of-image marker"
    );
    let png = samples::ASTRONAUT_MASK_PNG;
    let (status, v, _) = b64_upload(&srv, &srv.api.key, &png[..png.len() - 20]).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["msg"],
        "base64Data is truncated: the PNG data ends before its IEND chunk"
    );
    let webp = samples::COFFEE_WEBP;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&webp[..webp.len() / 2]);
    let (status, v) = json_upload(
        &srv,
        "/api/file-base64-upload",
        json!({"base64Data": format!("data:image/webp;base64,{b64}"), "uploadPath": "p"}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["msg"]
            .as_str()
            .unwrap()
            .starts_with("base64Data is truncated"),
        "{v}"
    );
    srv.stop().await;
}

#[tokio::test]
async fn base64_with_line_breaks_or_without_padding_round_trips() {
    let srv = TestServer::start().await;
    let png = samples::ASTRONAUT_MASK_PNG;
    let padded = base64::engine::general_purpose::STANDARD.encode(png);
    let wrapped = padded
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\r\n");
    let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(png);
    for data in [format!("data:image/png;base64,{wrapped}"), unpadded] {
        let (status, v) = json_upload(
            &srv,
            "/api/file-base64-upload",
            json!({"base64Data": data, "uploadPath": "p"}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let url = check_shape(&v, png.len(), "image/png");
        assert_eq!(download(&url).await.1, png);
    }
    srv.stop().await;
}
