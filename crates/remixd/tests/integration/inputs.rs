//! Hardening of the fetch stage: fetch slots are shared fairly between accounts, a
//! task's downloads run in parallel under one deadline, and this server's own files are
//! never fetched over HTTP, by any spelling: they are read from storage, and only by the
//! account they belong to. With `storage.private_files`, results are handed out as
//! signed links only.

use crate::common;

use std::time::{Duration, Instant};

use common::TestServer;
use remixd_testkit::{samples, task_body, Api, ImageServer, Receiver};
use serde_json::{json, Value};

const DONE: Duration = Duration::from_secs(60);

async fn upload(api: &Api, bytes: &[u8], name: &str) -> String {
    api.upload_ok(bytes, name).await
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().parse().unwrap()
}

/// The storage key of a `/files/` URL as remixd hands it out.
fn key_of(url: &str) -> String {
    url.split("/files/")
        .nth(1)
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_string()
}

/// Spellings of `http://127.0.0.1:{port}/files/{key}` that all name the same file of the
/// same server.
fn spellings(port: u16, key: &str) -> Vec<String> {
    let (prefix, rest) = key.split_once('/').unwrap();
    let first = &prefix[..1];
    let tail = &prefix[1..];
    vec![
        format!("HTTP://127.0.0.1:{port}/files/{key}"),
        format!("http://127.1:{port}/files/{key}"),
        format!("http://localhost:{port}/files/{key}"),
        format!("http://LOCALHOST.:{port}/files/{key}"),
        format!("http://127.0.0.1.:{port}/files/{key}"),
        format!("http://[::1]:{port}/files/{key}"),
        format!("http://0.0.0.0:{port}/files/{key}"),
        format!("http://127.0.0.1:{port}/files/{prefix}%2F{rest}"),
        format!(
            "http://127.0.0.1:{port}/files/{prefix}%2f{}",
            rest.replace('/', "%2F")
        ),
        format!("http://127.0.0.1:{port}/files/./{key}"),
        format!("http://127.0.0.1:{port}/files/%2e/{key}"),
        format!("http://127.0.0.1:{port}/files/%2E%2E/files/{key}"),
        format!(
            "http://127.0.0.1:{port}/files/%{:02X}{tail}/{rest}",
            first.as_bytes()[0]
        ),
    ]
}

/// A task with `base` as its image and `character` as its character reference.
fn task(base: &str, character: &str) -> Value {
    task_body(base, character, json!({}))
}

const REFUSED: &str = "is not usable by this account: the file does not exist or has expired, or belongs to another account";

#[tokio::test]
async fn one_account_cannot_hold_every_fetch_slot() {
    // Four fetch slots, two per account (the default: half). Downloads may take 30 s,
    // so without sharing the attacker's tasks would hold every slot that long.
    let srv = TestServer::start_with(|s| {
        s.fetch.timeout_s = 30;
        s.fetch.task_timeout_s = 60;
    })
    .await;
    let img = ImageServer::start().await;
    let attacker = srv.account("attacker", 10_000, Default::default()).await;
    let hang = img.url("hang");
    let mut hanging = Vec::new();
    for _ in 0..8 {
        hanging.push(attacker.create_ok(&task(&hang, &hang)).await);
    }
    // Two of its tasks are fetching: both URLs of each, in parallel, never answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while img.hits() < 4 {
        assert!(Instant::now() < deadline, "hits: {}", img.hits());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let t = Instant::now();
    let id = srv.api.create_ok(&img.sample_task(json!({}))).await;
    let d = srv.api.wait_done(&id, Duration::from_secs(20)).await;
    let took = t.elapsed();
    assert_eq!(d["state"], "success", "{d}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The attacker's tasks are all still waiting, and only two of them ever fetched.
    for id in &hanging {
        let a = attacker.record(id).await;
        assert_eq!(a.body["data"]["state"], "waiting", "{:?}", a.body);
    }
    assert_eq!(
        img.hits(),
        4 + 2,
        "2 hanging tasks × 2 URLs, then the other account's 2"
    );
    srv.stop().await;
}

#[tokio::test]
async fn a_tasks_downloads_run_in_parallel_under_one_deadline() {
    let srv = TestServer::start_with(|s| {
        s.fetch.timeout_s = 2;
        s.fetch.task_timeout_s = 3;
    })
    .await;
    let img = ImageServer::start().await;

    // Four URLs of 1.5 s each: together in about 1.5 s, well inside the 3 s deadline
    // (one after another they would take 6 s).
    let slow = img.url("slow/1500");
    let body = task_body(
        &slow,
        &slow,
        json!({"image_urls": [slow.clone(), slow.clone()]}),
    );
    let id = srv.api.create_ok(&body).await;
    let d = srv.api.wait_done(&id, DONE).await;
    assert_eq!(d["state"], "success", "{d}");

    // Eight URLs of 1.8 s each, none over the per-download limit of 2 s: two rounds of
    // four take 3.6 s, so the task fails at its 3 s deadline, naming a field still
    // downloading, not after 8 × 1.8 s (or 8 × 2 s).
    let slow = img.url("slow/1800");
    let body = task_body(
        &slow,
        &slow,
        json!({
            "reference_mask_urls": slow.clone(),
            "image_urls": vec![slow.clone(); 5],
        }),
    );
    let t = Instant::now();
    let id = srv.api.create_ok(&body).await;
    let d = srv.api.wait_done(&id, DONE).await;
    let took = t.elapsed();
    assert_eq!(
        (d["state"].as_str(), d["failCode"].as_str()),
        (Some("fail"), Some("422")),
        "{d}"
    );
    let msg = d["failMsg"].as_str().unwrap();
    assert!(
        msg.starts_with("input.image_urls[")
            && msg.contains("fetch.task_timeout_s")
            && msg.contains("3 s"),
        "{msg}"
    );
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(8),
        "took {took:?}"
    );
    srv.stop().await;
}

/// Runs `body` as a task of `api` and returns its final record.
async fn run(api: &Api, body: &Value) -> Value {
    let id = api.create_ok(body).await;
    api.wait_done(&id, DONE).await
}

fn assert_refused(d: &Value, field: &str, why: &str) {
    assert_eq!(
        (d["state"].as_str(), d["failCode"].as_str()),
        (Some("fail"), Some("422")),
        "{d}"
    );
    let msg = d["failMsg"].as_str().unwrap();
    assert!(
        msg.starts_with(field) && msg.contains(why),
        "{msg:?} should name {field}: {why}"
    );
}

#[tokio::test]
async fn this_servers_files_are_read_from_storage_by_their_account_only() {
    // public_url names the image server, standing in for a proxy in front of remixd:
    // a URL fetched over HTTP on that port would show as a hit there.
    let img = ImageServer::start().await;
    let srv = TestServer::start_with(|s| {
        s.server.public_url = Some(img.base.clone());
        s.fetch.allow = vec!["127.0.0.0/8".into(), "::1/128".into(), "0.0.0.0/32".into()];
    })
    .await;
    let (public_port, listen_port) = (port_of(&img.base), port_of(&srv.api.base));
    let owner = srv.account("owner", 10_000, Default::default()).await;
    let other = srv.account("other", 10_000, Default::default()).await;
    let base = upload(&owner, samples::COFFEE_WEBP, "base.webp").await;
    let character = upload(&owner, samples::ASTRONAUT_WEBP, "character.webp").await;
    let other_character = upload(&other, samples::ASTRONAUT_WEBP, "character.webp").await;
    assert!(base.starts_with(&img.base), "{base}");

    let first = run(&owner, &task(&base, &character)).await;
    assert_eq!(first["state"], "success", "{first}");
    let result_json: Value = serde_json::from_str(first["resultJson"].as_str().unwrap()).unwrap();
    let result = result_json["resultUrls"][0].as_str().unwrap().to_string();

    let mut urls = Vec::new();
    for port in [public_port, listen_port] {
        urls.extend(spellings(port, &key_of(&base)));
        urls.extend(spellings(port, &key_of(&result)).into_iter().take(3));
    }
    // Every spelling works for the owner and is refused to the other account, all
    // without a single HTTP request.
    let mut ids = Vec::new();
    for url in &urls {
        ids.push((
            url,
            owner.create_ok(&task(url, &character)).await,
            other.create_ok(&task(url, &other_character)).await,
        ));
    }
    for (url, mine, theirs) in ids {
        let d = owner.wait_done(&mine, DONE).await;
        assert_eq!(d["state"], "success", "{url}: {d}");
        let d = other.wait_done(&theirs, DONE).await;
        assert_refused(&d, "input.image_url", REFUSED);
    }
    // This server, but not one of its files: refused, not fetched.
    for url in [
        format!("http://127.0.0.1:{listen_port}/api/v1/chat/credit"),
        format!(
            "http://localhost:{public_port}/files/inputs/{}/base",
            first["taskId"].as_str().unwrap()
        ),
        format!("http://127.1:{listen_port}/files/uploads/..%2F..%2Fremixd.db"),
    ] {
        let d = run(&owner, &task(&url, &character)).await;
        assert_refused(
            &d,
            "input.image_url",
            "points to this server but not to one of its result or upload files",
        );
    }
    assert_eq!(img.hits(), 0, "nothing was fetched over HTTP");
    srv.stop().await;

    // A public URL without a port: the default-port spellings are this server too.
    let srv =
        TestServer::start_with(|s| s.server.public_url = Some("http://127.0.0.1".into())).await;
    let owner = srv.account("owner", 10_000, Default::default()).await;
    let other = srv.account("other", 10_000, Default::default()).await;
    let base = upload(&owner, samples::COFFEE_WEBP, "base.webp").await;
    let character = upload(&owner, samples::ASTRONAUT_WEBP, "character.webp").await;
    let other_character = upload(&other, samples::ASTRONAUT_WEBP, "character.webp").await;
    let key = key_of(&base);
    for url in [
        format!("http://127.0.0.1:80/files/{key}"),
        format!("HTTP://127.1/files/{key}"),
        format!("http://[::1]:80/files/{key}"),
        format!("http://localhost./files/{key}"),
    ] {
        let d = run(&owner, &task(&url, &character)).await;
        assert_eq!(d["state"], "success", "{url}: {d}");
        let d = run(&other, &task(&url, &other_character)).await;
        assert_refused(&d, "input.image_url", REFUSED);
    }
    srv.stop().await;
}

async fn get(url: &str) -> (u16, Vec<u8>) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

async fn download_url(api: &Api, url: &str) -> remixd_testkit::Answer {
    api.post_raw(
        "/api/v1/common/download-url",
        "application/json",
        json!({ "url": url }).to_string().into_bytes(),
    )
    .await
}

/// The last record the SSE stream of a finished task sends.
async fn last_streamed(api: &Api, task_id: &str) -> Value {
    let text = api
        .http
        .get(format!("{}/api/v1/jobs/stream?taskId={task_id}", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let data = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .next_back();
    serde_json::from_str(data.expect("a task event").trim()).unwrap()
}

/// The first value of `name` in a URL's query.
fn query(url: &str, name: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    u.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn download_url_signs_only_the_callers_own_files() {
    let srv = TestServer::start().await;
    let port = port_of(&srv.api.base);
    let owner = srv.account("owner", 10_000, Default::default()).await;
    let other = srv.account("other", 10_000, Default::default()).await;
    let base = upload(&owner, samples::COFFEE_WEBP, "base.webp").await;
    let character = upload(&owner, samples::ASTRONAUT_WEBP, "character.webp").await;
    let d = run(&owner, &task(&base, &character)).await;
    let doc: Value = serde_json::from_str(d["resultJson"].as_str().unwrap()).unwrap();
    let result = doc["resultUrls"][0].as_str().unwrap().to_string();

    for url in [
        base.clone(),
        result.clone(),
        format!("HTTP://LOCALHOST:{port}/files/./{}", key_of(&result)),
        spellings(port, &key_of(&base))[7].clone(),
    ] {
        let a = download_url(&other, &url).await;
        assert_eq!(
            (a.code(), &a.body["data"]),
            (422, &Value::Null),
            "{url}: {:?}",
            a.body
        );
        assert!(
            a.msg().contains("belongs to another account"),
            "{}",
            a.msg()
        );
        // The owner gets a link, by the same spelling, to the canonical URL.
        let a = download_url(&owner, &url).await;
        assert_eq!(a.code(), 200, "{url}: {:?}", a.body);
        let link = a.body["data"].as_str().unwrap();
        assert!(
            link.starts_with(&format!(
                "{}/files/{}?",
                srv.api.base,
                key_of(&url_canonical(&url, &base, &result))
            )),
            "{link}"
        );
        assert_eq!(get(link).await.0, 200);
    }
    srv.stop().await;
}

/// Which of the two files `url` is a spelling of.
fn url_canonical(url: &str, base: &str, result: &str) -> String {
    let name = |u: &str| u.rsplit('/').next().unwrap().to_string();
    if url.ends_with(&name(base)) {
        base.to_string()
    } else {
        result.to_string()
    }
}

#[tokio::test]
async fn private_files_are_served_through_signed_links_only() {
    let receiver = Receiver::start().await;
    let srv = TestServer::start_with(|s| s.storage.private_files = true).await;
    let owner = srv.account("owner", 10_000, Default::default()).await;
    let other = srv.account("other", 10_000, Default::default()).await;
    let base = upload(&owner, samples::COFFEE_WEBP, "base.webp").await;
    let character = upload(&owner, samples::ASTRONAUT_WEBP, "character.webp").await;
    // A plain upload URL answers 404 over HTTP, so the task's success shows the worker
    // read the uploads from storage.
    assert_eq!(get(&base).await.0, 404);
    let mut body = task(&base, &character);
    body["callBackUrl"] = json!(receiver.url("ok"));
    let d = run(&owner, &body).await;
    assert_eq!(d["state"], "success", "{d}");

    // recordInfo shows signed links that work; the stored plain URL does not.
    let doc: Value = serde_json::from_str(d["resultJson"].as_str().unwrap()).unwrap();
    let link = doc["resultUrls"][0].as_str().unwrap().to_string();
    assert_eq!(doc["images"][0]["url"].as_str(), Some(link.as_str()));
    let sig = query(&link, "signature");
    assert_eq!(sig.len(), 64, "{link}");
    let (status, bytes) = get(&link).await;
    assert_eq!(status, 200);
    assert!(bytes.starts_with(b"\x89PNG"));
    let plain = link.split('?').next().unwrap().to_string();
    assert_eq!(get(&plain).await.0, 404);
    let unsigned = link.replace(&format!("&signature={sig}"), "");
    assert!(unsigned.contains("expires=") && !unsigned.contains("signature"));
    assert_eq!(
        get(&unsigned).await.0,
        404,
        "a link without its signature is not signed"
    );
    assert_eq!(get(&link.replace(&sig, &sig.to_uppercase())).await.0, 404);
    assert_eq!(
        get(&format!("{link}&signature=")).await.0,
        404,
        "a signature given twice is no signature"
    );

    // The stream and the callback sign them too.
    let event = last_streamed(&owner, d["taskId"].as_str().unwrap()).await;
    let streamed: Value = serde_json::from_str(event["resultJson"].as_str().unwrap()).unwrap();
    assert_eq!(
        get(streamed["resultUrls"][0].as_str().unwrap()).await.0,
        200
    );
    let got = receiver.wait_for(1, DONE).await;
    let cb = got[0].json();
    let called: Value = serde_json::from_str(cb["data"]["resultJson"].as_str().unwrap()).unwrap();
    let cb_link = called["resultUrls"][0].as_str().unwrap();
    assert_eq!(get(cb_link).await.0, 200);
    let hours = (query(cb_link, "expires").parse::<i64>().unwrap() - remixd_domain::now_millis())
        as f64
        / 3_600_000.0;
    assert!(
        (23.9..=24.0).contains(&hours),
        "callback links outlive the retries: {hours} h"
    );

    // download-url: the owner's files, never another account's.
    let a = download_url(&owner, &base).await;
    assert_eq!(a.code(), 200, "{:?}", a.body);
    assert_eq!(get(a.body["data"].as_str().unwrap()).await.0, 200);
    for url in [&base, &plain, &link] {
        let a = download_url(&other, url).await;
        assert_eq!(a.code(), 422, "{url}: {:?}", a.body);
    }
    srv.stop().await;
}

/// With `storage.public = "presigned"`, every answer that shows a file (recordInfo, the
/// stream, the callback, download-url) hands out a bucket URL signed for its life, which
/// the bucket serves with the stored bytes and refuses once tampered with. With
/// `storage.private_files` too, the API nodes serve no plain URL: every byte the client
/// reads comes from the bucket. Upload answers keep this server's URL, the handle tasks
/// name their inputs by; a presigned link given back as an input is this server's file,
/// under the ownership rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_answers_hand_out_bucket_urls() {
    let s3 = remixd_testkit::s3::S3Server::start("remixd").await;
    let receiver = Receiver::start().await;
    let srv = TestServer::start_with(|s| {
        common::use_bucket(s, &s3, "files");
        s.storage.public = remixd::settings::PublicFiles::Presigned;
        s.storage.private_files = true;
    })
    .await;
    let owner = srv.account("owner", 10_000, Default::default()).await;
    let other = srv.account("other", 10_000, Default::default()).await;
    let base = upload(&owner, samples::COFFEE_WEBP, "base.webp").await;
    let character = upload(&owner, samples::ASTRONAUT_WEBP, "character.webp").await;
    assert!(
        base.starts_with(&format!("{}/files/uploads/", srv.api.base)),
        "{base}"
    );
    let mut body = task(&base, &character);
    body["callBackUrl"] = json!(receiver.url("ok"));
    let d = run(&owner, &body).await;
    assert_eq!(d["state"], "success", "{d}");

    // The bucket's object of a presigned URL (path-style: /<bucket>/<prefix>/<key>).
    let bucket_prefix = format!("{}/remixd/files/", s3.endpoint);
    let object = |link: &str| -> Vec<u8> {
        let path = link.split('?').next().unwrap();
        let rel = path
            .strip_prefix(&bucket_prefix)
            .unwrap_or_else(|| panic!("{link} is not a URL of the bucket {bucket_prefix}"));
        std::fs::read(s3.root.join("remixd/files").join(rel)).expect("the object")
    };
    let lifetime = |link: &str| query(link, "X-Amz-Expires").parse::<u64>().unwrap();

    // recordInfo: both spellings of the result are the same presigned object.
    let doc: Value = serde_json::from_str(d["resultJson"].as_str().unwrap()).unwrap();
    let link = doc["resultUrls"][0].as_str().unwrap().to_string();
    assert!(
        link.contains("/results/") && query(&link, "X-Amz-Signature").len() == 64,
        "{link}"
    );
    let image_link = doc["images"][0]["url"].as_str().unwrap();
    assert_eq!(image_link.split('?').next(), link.split('?').next());
    assert_eq!(lifetime(&link), 20 * 60);
    let (status, bytes) = get(&link).await;
    assert_eq!(status, 200);
    assert!(bytes.starts_with(b"\x89PNG"));
    assert_eq!(bytes, object(&link), "the bucket serves the stored bytes");
    let sig = query(&link, "X-Amz-Signature");
    let forged = link.replace(
        &sig,
        &format!(
            "{}{}",
            &sig[..63],
            if sig.ends_with('0') { '1' } else { '0' }
        ),
    );
    assert_eq!(
        get(&forged).await.0,
        403,
        "a tampered presigned URL is refused"
    );
    let key = link
        .strip_prefix(&bucket_prefix)
        .unwrap()
        .split('?')
        .next()
        .unwrap();
    let plain = format!("{}/files/{key}", srv.api.base);
    assert_eq!(
        get(&plain).await.0,
        404,
        "private: no plain URL through the API"
    );

    // A presigned link is this server's file, by any spelling of the bucket: a task of
    // its owner reads it from storage ("remix again"), another account's is refused,
    // though the link itself would let anyone download it.
    let again = run(
        &owner,
        &task(&link.replace("http://", "HTTP://"), &character),
    )
    .await;
    assert_eq!(again["state"], "success", "{again}");
    let theirs = upload(&other, samples::ASTRONAUT_WEBP, "character.webp").await;
    let stolen = run(&other, &task(&link, &theirs)).await;
    assert_refused(&stolen, "input.image_url", REFUSED);

    // The stream's last event.
    let event = last_streamed(&owner, d["taskId"].as_str().unwrap()).await;
    let streamed: Value = serde_json::from_str(event["resultJson"].as_str().unwrap()).unwrap();
    let streamed = streamed["resultUrls"][0].as_str().unwrap();
    assert_eq!(object(streamed), get(streamed).await.1);

    // The callback: presigned for 24 hours, outliving the retries.
    let got = receiver.wait_for(1, DONE).await;
    let cb = got[0].json();
    let called: Value = serde_json::from_str(cb["data"]["resultJson"].as_str().unwrap()).unwrap();
    let cb_link = called["resultUrls"][0].as_str().unwrap();
    assert_eq!(lifetime(cb_link), 24 * 3600);
    assert_eq!(get(cb_link).await, (200, object(cb_link)));

    // download-url: an upload of the owner's, from the bucket; never another account's.
    let a = download_url(&owner, &base).await;
    assert_eq!(a.code(), 200, "{:?}", a.body);
    let up = a.body["data"].as_str().unwrap();
    assert_eq!(lifetime(up), 20 * 60);
    assert_eq!(get(up).await, (200, samples::COFFEE_WEBP.to_vec()));
    assert_eq!(download_url(&other, &base).await.code(), 422);
    srv.stop().await;
}
