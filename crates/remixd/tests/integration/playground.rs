//! The playground in a real browser: Debian's headless Chromium, driven over the Chrome
//! DevTools Protocol (`chromiumoxide`), against a live remixd on loopback with the
//! preview engine. A person's whole visit: enter a key, upload a base image, a character
//! reference, a mask and a style image, see the cost, submit, watch the progress, see
//! two results, download one (the same bytes the API serves), see a validation error
//! next to its field (and an unreachable URL's next to its image), re-open a task from
//! the history, remix it again (by keyboard), forget the key; light and dark.
//! Screenshots of the main states at desktop and phone width go to
//! `target/playground-screenshots/`. The page runs under its own Content-Security-Policy
//! the whole time, and no request URL ever carries the key.
//!
//! `scripts/test.sh` installs Chromium when missing; `REMIXD_TEST_CHROMIUM` names
//! another executable. Without one the test fails and says why: it is never skipped.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::browser::{
    SetDownloadBehaviorBehavior, SetDownloadBehaviorParams,
};
use chromiumoxide::cdp::browser_protocol::dom::SetFileInputFilesParams;
use chromiumoxide::cdp::browser_protocol::emulation::{
    MediaFeature, SetDeviceMetricsOverrideParams,
};
use chromiumoxide::cdp::browser_protocol::network::EventRequestWillBeSent;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::Page;
use common::TestServer;
use futures::StreamExt;
use remixd_testkit::{samples, task_body};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn chromium() -> PathBuf {
    if let Ok(p) = std::env::var("REMIXD_TEST_CHROMIUM") {
        return PathBuf::from(p);
    }
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "no Chromium: scripts/test.sh installs Debian's chromium package; \
         or set REMIXD_TEST_CHROMIUM to a Chromium executable"
    );
}

/// A headless Chromium with its own profile, its events handled in the background.
async fn browser(profile: &Path) -> Browser {
    let config = BrowserConfig::builder()
        .chrome_executable(chromium())
        .user_data_dir(profile)
        .no_sandbox()
        .new_headless_mode()
        .window_size(1280, 900)
        .viewport(None)
        .args(["--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .build()
        .expect("browser config");
    let (browser, mut handler) = Browser::launch(config).await.expect("launch Chromium");
    tokio::spawn(async move { while handler.next().await.is_some() {} });
    browser
}

async fn eval<T: serde::de::DeserializeOwned>(page: &Page, js: &str) -> T {
    page.evaluate(js)
        .await
        .unwrap_or_else(|e| panic!("{js}: {e}"))
        .into_value()
        .unwrap_or_else(|e| panic!("{js}: {e}"))
}

/// Waits until the JavaScript expression `js` is true.
async fn until(page: &Page, js: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if eval::<bool>(page, &format!("!!({js})")).await {
            return;
        }
        assert!(Instant::now() < deadline, "never true: {js}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Clicks an element with the mouse.
async fn click(page: &Page, selector: &str) {
    page.find_element(selector)
        .await
        .expect(selector)
        .click()
        .await
        .expect(selector);
}

/// Clicks into a field and types `text`.
async fn type_into(page: &Page, selector: &str, text: impl AsRef<str>) {
    click(page, selector).await;
    page.find_element(selector)
        .await
        .expect(selector)
        .type_str(text)
        .await
        .expect(selector);
}

/// Presses a key with `selector` focused.
async fn press(page: &Page, selector: &str, key: &str) {
    page.find_element(selector)
        .await
        .expect(selector)
        .focus()
        .await
        .expect(selector)
        .press_key(key)
        .await
        .expect(selector);
}

/// Runs statements in the page.
async fn run(page: &Page, statements: &str) {
    assert!(eval::<bool>(page, &format!("(() => {{ {statements}; return true; }})()")).await);
}

async fn text(page: &Page, selector: &str) -> String {
    eval(
        page,
        &format!("document.querySelector({selector:?}).textContent"),
    )
    .await
}

/// Sets a file input's files the way a person's choice does (its change event fires).
async fn choose_files(page: &Page, selector: &str, files: &[&Path]) {
    let input = page.find_element(selector).await.expect(selector);
    page.execute(
        SetFileInputFilesParams::builder()
            .files(files.iter().map(|f| f.display().to_string()))
            .backend_node_id(input.backend_node_id)
            .build()
            .unwrap(),
    )
    .await
    .expect("set files");
}

/// Picks an option of a `<select>` with the keyboard's effect: value and change event.
async fn select(page: &Page, id: &str, value: &str) {
    run(
        page,
        &format!(
            "const s = document.getElementById({id:?}); s.value = {value:?}; \
             s.dispatchEvent(new Event('change'))"
        ),
    )
    .await;
}

async fn screenshot(page: &Page, name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/playground-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    page.save_screenshot(
        ScreenshotParams::builder().full_page(true).build(),
        dir.join(format!("{name}.png")),
    )
    .await
    .expect("screenshot");
}

async fn phone_width(page: &Page) {
    page.execute(
        SetDeviceMetricsOverrideParams::builder()
            .width(390)
            .height(844)
            .device_scale_factor(2.0)
            .mobile(true)
            .build()
            .unwrap(),
    )
    .await
    .expect("phone metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_visit_from_key_to_remix_again() {
    let srv = TestServer::start_with(|s| s.engine.preview.delay_ms = 150).await;
    let img = remixd_testkit::ImageServer::start().await;
    let key = srv.api.key.clone();
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = files.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let base = write("coffee.webp", samples::COFFEE_WEBP);
    let character = write("astronaut.webp", samples::ASTRONAUT_WEBP);
    let mask = write("mask.png", &samples::png(64, 64, [255, 255, 255]));
    let style = write("style.png", &samples::png(96, 64, [200, 40, 90]));
    let downloads = tempfile::tempdir().unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut browser = browser(profile.path()).await;
    browser
        .execute(
            SetDownloadBehaviorParams::builder()
                .behavior(SetDownloadBehaviorBehavior::Allow)
                .download_path(downloads.path().display().to_string())
                .build()
                .unwrap(),
        )
        .await
        .expect("downloads");

    let page = browser.new_page("about:blank").await.expect("page");
    // Every request the page makes, and every policy violation it meets.
    let urls = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut requests = page
        .event_listener::<EventRequestWillBeSent>()
        .await
        .unwrap();
    let seen = urls.clone();
    tokio::spawn(async move {
        while let Some(e) = requests.next().await {
            seen.lock().unwrap().push(e.request.url.clone());
        }
    });
    page.evaluate_on_new_document(
        "window.__violations = []; document.addEventListener('securitypolicyviolation', \
         (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));",
    )
    .await
    .unwrap();
    page.goto(format!("{}/", srv.api.base))
        .await
        .expect("open /");
    until(
        &page,
        "document.querySelectorAll('#image_size option').length === 6",
    )
    .await;
    assert_eq!(text(&page, "#balance").await, "Paste an API key to start.");
    screenshot(&page, "desktop-empty").await;

    // The key: typed, kept in local storage, the balance shown.
    type_into(&page, "#api-key", &key).await;
    press(&page, "#api-key", "Tab").await;
    until(
        &page,
        "document.getElementById('balance').textContent.startsWith('Balance')",
    )
    .await;
    let balance = srv.api.balance().await;
    assert_eq!(
        text(&page, "#balance").await,
        format!("Balance: {balance} credits")
    );
    assert_eq!(
        eval::<String>(&page, "localStorage.getItem('remixd.apiKey')").await,
        key
    );

    // A URL that cannot be fetched: the upload's error shows next to its image.
    type_into(&page, "#url-image_url", img.url("missing.png")).await;
    press(&page, "#url-image_url", "Tab").await;
    until(
        &page,
        "document.getElementById('err-image_url').textContent.includes('404')",
    )
    .await;
    assert!(
        text(&page, "#err-image_url")
            .await
            .starts_with(&img.url("missing.png")),
        "{}",
        text(&page, "#err-image_url").await
    );
    run(&page, "document.getElementById('url-image_url').value = ''").await;

    // The three kinds of image, and a style image, uploaded as they are chosen; the
    // previews show this server's URLs.
    choose_files(&page, "#file-image_url", &[&base]).await;
    choose_files(&page, "#file-reference_image_urls", &[&character]).await;
    choose_files(&page, "#file-reference_mask_urls", &[&mask]).await;
    choose_files(&page, "#file-image_urls", &[&style]).await;
    let own = format!("{}/files/uploads/", srv.api.base);
    for slot in ["image_url", "reference_image_urls", "reference_mask_urls"] {
        until(
            &page,
            &format!(
                "(document.querySelector('#slot-{slot} .preview').src || '').startsWith({own:?})"
            ),
        )
        .await;
    }
    until(
        &page,
        &format!("(document.querySelector('#slot-image_urls .thumbs img') || {{}}).src?.startsWith({own:?})"),
    )
    .await;
    let uploaded_base: String = eval(
        &page,
        "document.querySelector('#slot-image_url .preview').src",
    )
    .await;

    // A pasted URL of another server is copied to this one first; a dropped file is
    // uploaded like a chosen one.
    type_into(&page, "#url-image_urls", img.url("coffee.webp")).await;
    press(&page, "#url-image_urls", "Tab").await;
    until(
        &page,
        &format!(
            "[...document.querySelectorAll('#slot-image_urls .thumbs img')].length === 2 && \
             [...document.querySelectorAll('#slot-image_urls .thumbs img')].every((i) => i.src.startsWith({own:?}))"
        ),
    )
    .await;
    let first_mask: String = eval(
        &page,
        "document.querySelector('#slot-reference_mask_urls .preview').src",
    )
    .await;
    run(
        &page,
        &format!(
            "fetch({first_mask:?}).then((r) => r.blob()).then((b) => {{ \
               const dt = new DataTransfer(); \
               dt.items.add(new File([b], 'dropped.png', {{ type: 'image/png' }})); \
               document.querySelector('#slot-reference_mask_urls .drop') \
                 .dispatchEvent(new DragEvent('drop', {{ dataTransfer: dt, bubbles: true, cancelable: true }})); \
             }})"
        ),
    )
    .await;
    until(
        &page,
        &format!(
            "(() => {{ const s = document.querySelector('#slot-reference_mask_urls .preview').src; \
             return s.startsWith({own:?}) && s !== {first_mask:?} && s.endsWith('dropped.png'); }})()"
        ),
    )
    .await;

    // Every control has a label (or a name of its own).
    assert_eq!(
        eval::<Vec<String>>(
            &page,
            "[...document.querySelectorAll('input, select, textarea, button')].filter((e) => \
               !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && \
               !(e.tagName === 'BUTTON' && e.textContent.trim())).map((e) => e.id || e.outerHTML)"
        )
        .await,
        Vec::<String>::new()
    );

    // The fields: a prompt, two images; the cost follows before submitting.
    let prompt = "an astronaut having coffee in the browser";
    type_into(&page, "#prompt", prompt).await;
    assert_eq!(
        text(&page, "#prompt-count").await,
        format!("{} / 5000", prompt.len())
    );
    select(&page, "num_images", "2").await;
    select(&page, "image_size", "square").await;
    assert_eq!(
        text(&page, "#cost").await,
        "Cost: 36 credits (18 per image)"
    );

    // The dice picks a seed; "copy as curl" shows the exact request, without the key.
    click(&page, "#dice").await;
    let seed: String = eval(&page, "document.getElementById('seed').value").await;
    assert!(
        seed.parse::<u32>().is_ok_and(|s| s <= 2_147_483_647),
        "{seed:?}"
    );
    click(&page, "#copy-curl").await;
    until(&page, "!document.getElementById('curl').hidden").await;
    let curl = text(&page, "#curl").await;
    assert!(
        curl.contains("/api/v1/jobs/createTask") && curl.contains("$REMIXD_API_KEY"),
        "{curl}"
    );
    assert!(!curl.contains(&key));
    let curl_body: Value = serde_json::from_str(
        curl.split_once("-d '")
            .expect("a body")
            .1
            .trim_end()
            .strip_suffix('\'')
            .unwrap(),
    )
    .unwrap();
    assert_eq!(curl_body["input"]["seed"].to_string(), seed);
    screenshot(&page, "desktop-filled").await;

    // Submit: progress from the stream, then two results and the new balance.
    click(&page, "#submit").await;
    until(
        &page,
        "document.getElementById('state').textContent.startsWith('success')",
    )
    .await;
    assert_eq!(
        eval::<i64>(&page, "document.getElementById('progress').value").await,
        100
    );
    until(
        &page,
        "document.querySelectorAll('#results img').length === 2",
    )
    .await;
    until(&page, "[...document.querySelectorAll('#results img')].every((i) => i.complete && i.naturalWidth === 512)").await;
    until(
        &page,
        &format!(
            "document.getElementById('balance').textContent === 'Balance: {} credits'",
            balance - 36
        ),
    )
    .await;
    assert_eq!(srv.api.balance().await, balance - 36);
    // The request the page sent is the one "copy as curl" showed.
    let task_id = text(&page, "#task-id").await.replace("Task ", "");
    let sent: Value = serde_json::from_str(
        srv.api.record(&task_id).await.body["data"]["param"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(sent, curl_body);
    screenshot(&page, "desktop-results").await;

    // Download the first result: the browser's file is the API's bytes.
    let href: String = eval(&page, "document.querySelector('#results a.download').href").await;
    click(&page, "#results a.download").await;
    let deadline = Instant::now() + WAIT;
    let downloaded = loop {
        let done: Vec<PathBuf> = std::fs::read_dir(downloads.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "png"))
            .collect();
        if let Some(p) = done.first() {
            break std::fs::read(p).unwrap();
        }
        assert!(Instant::now() < deadline, "no download arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let from_api = reqwest::get(&href).await.unwrap().bytes().await.unwrap();
    assert!(from_api.starts_with(b"\x89PNG"));
    assert_eq!(
        downloaded,
        from_api.to_vec(),
        "the download is the API's file"
    );

    // A bad field: the API's message shows next to the prompt.
    run(
        &page,
        "const p = document.getElementById('prompt'); p.value = ''; \
         p.dispatchEvent(new Event('input'))",
    )
    .await;
    click(&page, "#submit").await;
    until(
        &page,
        "document.getElementById('err-prompt').textContent !== ''",
    )
    .await;
    let err = text(&page, "#err-prompt").await;
    assert!(err.starts_with("input.prompt"), "{err}");
    assert_eq!(
        eval::<String>(
            &page,
            "document.getElementById('prompt').getAttribute('aria-invalid')"
        )
        .await,
        "true"
    );
    screenshot(&page, "desktop-error").await;

    // History: the task is there; re-open it, then remix it again into the form.
    until(
        &page,
        "document.querySelectorAll('#history li').length >= 1",
    )
    .await;
    run(
        &page,
        "document.getElementById('results').replaceChildren()",
    )
    .await;
    click(&page, "#history li button").await;
    until(
        &page,
        "document.querySelectorAll('#results img').length === 2",
    )
    .await;
    // By keyboard this time: focus the button, press Enter.
    press(&page, "#remix-again", "Enter").await;
    assert_eq!(
        eval::<String>(&page, "document.getElementById('prompt').value").await,
        prompt
    );
    assert_eq!(
        eval::<String>(
            &page,
            "document.querySelector('#slot-image_url .preview').src"
        )
        .await,
        uploaded_base
    );
    assert_eq!(
        eval::<String>(&page, "document.getElementById('num_images').value").await,
        "2"
    );
    assert_eq!(
        eval::<String>(&page, "document.getElementById('seed').value").await,
        seed
    );
    assert_eq!(
        text(&page, "#err-prompt").await,
        "",
        "the old error is gone"
    );
    assert_eq!(
        eval::<String>(&page, "document.getElementById('url-image_urls').value").await,
        "",
        "the form holds the task's inputs only"
    );

    // A task a client made with another server's images: opened from the history, its
    // inputs are named, not loaded (the policy would refuse them anyway).
    let foreign = srv
        .api
        .create_ok(&img.sample_task(serde_json::json!({"image_size": "square"})))
        .await;
    srv.api.wait_done(&foreign, WAIT).await;
    click(&page, "#refresh-history").await;
    until(
        &page,
        &format!("document.querySelector('#history li button').getAttribute('aria-label') === 'Open task {foreign}'"),
    )
    .await;
    click(&page, "#history li button").await;
    until(
        &page,
        "document.querySelectorAll('#inputs figcaption.foreign').length === 2",
    )
    .await;
    assert_eq!(
        eval::<usize>(&page, "document.querySelectorAll('#inputs img').length").await,
        0
    );
    until(
        &page,
        "document.querySelectorAll('#results img').length === 1",
    )
    .await;

    // An accepted task that fails: one a client made with a base image that is gone.
    // Opened, it shows why; remixed again from the page, the new task fails the same
    // way after it was accepted, and its failMsg shows next to the base image.
    let failed = srv
        .api
        .create_ok(&task_body(
            &img.url("missing.png"),
            &img.url("astronaut.webp"),
            serde_json::json!({"image_size": "square"}),
        ))
        .await;
    let record = srv.api.wait_done(&failed, WAIT).await;
    assert_eq!(record["state"], "fail", "{record}");
    let fail_msg = record["failMsg"].as_str().unwrap().to_string();
    assert!(fail_msg.starts_with("input.image_url"), "{fail_msg}");
    click(&page, "#refresh-history").await;
    until(
        &page,
        &format!("document.querySelector('#history li button').getAttribute('aria-label') === 'Open task {failed}'"),
    )
    .await;
    click(&page, "#history li button").await;
    until(
        &page,
        "document.getElementById('state').textContent.startsWith('Failed')",
    )
    .await;
    assert_eq!(text(&page, "#state").await, format!("Failed: {fail_msg}"));
    press(&page, "#remix-again", "Enter").await;
    // The form names the other server's images instead of loading them.
    let named = text(&page, "#slot-image_url .drop .foreign").await;
    assert!(
        named.ends_with(&format!("({})", img.url("missing.png"))),
        "{named}"
    );
    assert!(
        eval::<bool>(
            &page,
            "document.querySelector('#slot-image_url .preview').hidden \
             && !document.querySelector('#slot-image_url .preview').hasAttribute('src')"
        )
        .await
    );
    // The curl command shown earlier follows the form.
    let curl = text(&page, "#curl").await;
    assert!(curl.contains(&img.url("missing.png")), "{curl}");
    click(&page, "#submit").await;
    until(
        &page,
        "document.getElementById('err-image_url').textContent !== ''",
    )
    .await;
    assert_eq!(text(&page, "#err-image_url").await, fail_msg);
    let shown = text(&page, "#task-id").await;
    let again = shown
        .strip_prefix("Task ")
        .expect("the page names its task");
    assert_ne!(again, failed, "a new task was accepted");
    let record = srv.api.wait_done(again, WAIT).await;
    assert_eq!(
        (record["state"].as_str(), record["failMsg"].as_str()),
        (Some("fail"), Some(fail_msg.as_str()))
    );
    screenshot(&page, "desktop-failed").await;

    // Dark, by the system's setting.
    page.emulate_media_features(vec![MediaFeature {
        name: "prefers-color-scheme".into(),
        value: "dark".into(),
    }])
    .await
    .unwrap();
    assert_eq!(
        eval::<String>(&page, "getComputedStyle(document.body).backgroundColor").await,
        "rgb(20, 20, 19)"
    );
    screenshot(&page, "desktop-dark").await;

    // Phone width: the same page, nothing wider than the screen.
    phone_width(&page).await;
    assert!(
        eval::<bool>(
            &page,
            "document.documentElement.scrollWidth <= window.innerWidth"
        )
        .await,
        "the page scrolls sideways at phone width"
    );
    screenshot(&page, "phone-remix-again").await;

    // Forget the key: gone from storage and from the form.
    click(&page, "#forget-key").await;
    assert!(
        eval::<bool>(&page, "localStorage.getItem('remixd.apiKey') === null").await,
        "the key is gone from local storage"
    );
    assert_eq!(
        eval::<String>(&page, "document.getElementById('api-key').value").await,
        ""
    );
    screenshot(&page, "phone-forgotten").await;

    // All along: no policy violation, and the key in no URL.
    assert_eq!(
        eval::<Vec<String>>(&page, "window.__violations").await,
        Vec::<String>::new()
    );
    let urls = urls.lock().unwrap().clone();
    assert!(urls.len() > 10, "{urls:?}");
    assert!(urls.iter().all(|u| !u.contains(&key)), "{urls:?}");
    browser.close().await.unwrap();
    srv.stop().await;
}

/// Without a browser: every playground response carries the policy headers, the
/// page's prices are the server's, and `server.playground = false` takes it away.
#[tokio::test]
async fn the_page_is_served_with_its_policy_and_can_be_turned_off() {
    let srv = TestServer::start_with(|s| s.credits.turbo = 7).await;
    for path in [
        "/",
        "/playground",
        "/playground/app.js",
        "/playground/app.css",
        "/playground/config.json",
    ] {
        let r = reqwest::get(format!("{}{path}", srv.api.base))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'self'; style-src 'self';"),
            "{path}: {csp}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{path}");
    }
    let config: Value = reqwest::get(format!("{}/playground/config.json", srv.api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["prices"]["TURBO"], 7);
    assert_eq!(config["sizes"][0]["name"], "square");
    srv.stop().await;

    let off = TestServer::start_with(|s| s.server.playground = false).await;
    for path in ["/", "/playground", "/playground/app.js"] {
        let r = reqwest::get(format!("{}{path}", off.api.base))
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], 404, "the contract's envelope: {body}");
    }
    off.stop().await;
}
