//! The connection-level guard against real sockets, on loopback only: loopback is
//! blocked by default and reachable only when `fetch.allow` names it. Every target here
//! is 127.0.0.1, 127.0.0.2 or [::1]; nothing leaves the machine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use remixd_fetch::{FetchConfig, FetchError, Fetcher, ImageKind};

#[derive(Clone, Default)]
struct Seen(Arc<AtomicUsize>);

fn tiny_png() -> Vec<u8> {
    let img = image::RgbImage::from_pixel(3, 2, image::Rgb([10, 20, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn png(State(s): State<Seen>) -> Response {
    s.0.fetch_add(1, Ordering::SeqCst);
    ([(header::CONTENT_TYPE, "text/plain")], tiny_png()).into_response() // the type claim is ignored
}

async fn redirect_to(State(s): State<Seen>, Path(target): Path<String>) -> Response {
    s.0.fetch_add(1, Ordering::SeqCst);
    let to = target.replace('~', "/");
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

async fn hops(State(s): State<Seen>, Path(n): Path<u32>) -> Response {
    s.0.fetch_add(1, Ordering::SeqCst);
    let to = if n == 0 {
        "/png".to_string()
    } else {
        format!("/hops/{}", n - 1)
    };
    (StatusCode::FOUND, [(header::LOCATION, to)]).into_response()
}

/// 2 MiB streamed in 64 KiB chunks without a Content-Length; counts chunks sent.
async fn stream(State(s): State<Seen>) -> Response {
    let sent = s.0.clone();
    let chunks = futures::stream::iter(0..32).then(move |_| {
        let sent = sent.clone();
        async move {
            sent.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, std::io::Error>(vec![0u8; 64 * 1024])
        }
    });
    Body::from_stream(chunks).into_response()
}

async fn big(State(s): State<Seen>) -> Response {
    s.0.fetch_add(1, Ordering::SeqCst);
    vec![0u8; 300_000].into_response()
}

async fn slow(State(s): State<Seen>) -> Response {
    s.0.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    tiny_png().into_response()
}

async fn not_found(State(s): State<Seen>) -> Response {
    s.0.fetch_add(1, Ordering::SeqCst);
    StatusCode::NOT_FOUND.into_response()
}

use futures::StreamExt;

/// Starts a server on `addr` (a loopback address, port 0).
async fn server(addr: &str) -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/png", get(png))
        .route("/to/{target}", get(redirect_to))
        .route("/hops/{n}", get(hops))
        .route("/stream", get(stream))
        .route("/big", get(big))
        .route("/slow", get(slow))
        .route("/missing", get(not_found))
        .with_state(seen.clone());
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("{}", port), seen)
}

fn fetcher(allow: &[&str]) -> Fetcher {
    Fetcher::new(FetchConfig {
        allow: allow.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_millis(800),
        max_image_bytes: 100_000,
        ..FetchConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn loopback_is_blocked_by_default_and_never_contacted() {
    let (port, seen) = server("127.0.0.1:0").await;
    let f = fetcher(&[]);
    let e = f
        .download(&format!("http://127.0.0.1:{port}/png"), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Blocked { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "points to a blocked address 127.0.0.1 (loopback)"
    );
    // By name, through the resolver.
    let e = f
        .download(&format!("http://localhost:{port}/png"), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Blocked { .. }), "{e:?}");
    assert!(e.to_string().contains("loopback"));
    assert_eq!(
        seen.0.load(Ordering::SeqCst),
        0,
        "the server never saw a request"
    );
}

#[tokio::test]
async fn fetch_allow_opens_exactly_what_it_names() {
    let (port, seen) = server("127.0.0.1:0").await;
    let by_cidr = fetcher(&["127.0.0.1/32"]);
    let img = by_cidr
        .fetch_image(&format!("http://127.0.0.1:{port}/png"), 1000)
        .await
        .unwrap();
    assert_eq!((img.kind, img.width, img.height), (ImageKind::Png, 3, 2));
    assert_eq!(img.bytes.as_ref(), tiny_png().as_slice());
    let by_name = fetcher(&["localhost"]);
    assert!(by_name
        .download(&format!("http://localhost:{port}/png"), 1000)
        .await
        .is_ok());
    assert_eq!(seen.0.load(Ordering::SeqCst), 2);

    // 127.0.0.2 is loopback too, but outside 127.0.0.1/32.
    let (port2, seen2) = server("127.0.0.2:0").await;
    let e = by_cidr
        .download(&format!("http://127.0.0.2:{port2}/png"), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Blocked { .. }), "{e:?}");
    assert_eq!(seen2.0.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn every_redirect_hop_is_checked() {
    let (port, seen) = server("127.0.0.1:0").await;
    let (port2, seen2) = server("127.0.0.2:0").await;
    let f = fetcher(&["127.0.0.1/32"]);
    // An allowed host redirecting to a blocked one: refused at the second hop.
    let target = format!("http:~~127.0.0.2:{port2}~png");
    let e = f
        .download(&format!("http://127.0.0.1:{port}/to/{target}"), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Blocked { .. }), "{e:?}");
    assert_eq!(seen2.0.load(Ordering::SeqCst), 0);
    // ...and to [::1], which the allow list does not name either.
    let target = format!("http:~~[::1]:{port2}~png");
    let e = f
        .download(&format!("http://127.0.0.1:{port}/to/{target}"), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Blocked { .. }), "{e:?}");
    // Userinfo and other schemes in a Location are refused too.
    let e = f
        .download(
            &format!("http://127.0.0.1:{port}/to/http:~~u:p@127.0.0.1:{port}~png"),
            1000,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::BadUrl(_)), "{e:?}");
    let e = f
        .download(
            &format!("http://127.0.0.1:{port}/to/file:~~~etc~passwd"),
            1000,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::BadUrl(_)), "{e:?}");

    // Three hops are followed, a fourth is not.
    assert!(f
        .download(&format!("http://127.0.0.1:{port}/hops/2"), 1000)
        .await
        .is_ok());
    let before = seen.0.load(Ordering::SeqCst);
    let e = f
        .download(&format!("http://127.0.0.1:{port}/hops/3"), 1000)
        .await
        .unwrap_err();
    assert_eq!(e, FetchError::TooManyRedirects);
    assert_eq!(
        seen.0.load(Ordering::SeqCst) - before,
        4,
        "four responses read, the fifth never requested"
    );
}

#[tokio::test]
async fn the_byte_cap_stops_reading_early() {
    let (port, seen) = server("127.0.0.1:0").await;
    let f = fetcher(&["127.0.0.1/32"]);
    // With a Content-Length: refused before the body.
    let e = f
        .download(&format!("http://127.0.0.1:{port}/big"), 100_000)
        .await
        .unwrap_err();
    assert_eq!(e, FetchError::TooLarge { limit: 100_000 });
    // Streamed without a length: refused once past the cap; the server is not drained.
    let before = seen.0.load(Ordering::SeqCst);
    let e = f
        .download(&format!("http://127.0.0.1:{port}/stream"), 100_000)
        .await
        .unwrap_err();
    assert_eq!(e, FetchError::TooLarge { limit: 100_000 });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chunks = seen.0.load(Ordering::SeqCst) - before;
    assert!(
        chunks < 16,
        "the stream of 32 chunks was cut short ({chunks} produced)"
    );
}

#[tokio::test]
async fn timeouts_statuses_and_non_images() {
    let (port, _) = server("127.0.0.1:0").await;
    let f = fetcher(&["127.0.0.1/32"]);
    let t = Instant::now();
    let e = f
        .download(&format!("http://127.0.0.1:{port}/slow"), 1000)
        .await
        .unwrap_err();
    assert!(matches!(e, FetchError::Timeout { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(
        f.download(&format!("http://127.0.0.1:{port}/missing"), 1000)
            .await
            .unwrap_err(),
        FetchError::Status(404)
    );
    assert_eq!(
        f.fetch_image(&format!("http://127.0.0.1:{port}/hops/0"), 10)
            .await
            .unwrap_err(),
        FetchError::TooLarge { limit: 10 }
    );
    // Port 9 on loopback: nothing listens.
    let e = f.download("http://127.0.0.1:9/x", 1000).await.unwrap_err();
    assert!(matches!(e, FetchError::Unreachable(_)), "{e:?}");
    assert!(matches!(
        f.download("ftp://127.0.0.1/x", 1000).await.unwrap_err(),
        FetchError::BadUrl(_)
    ));
    assert!(matches!(
        f.download("http://u:p@127.0.0.1/x", 1000)
            .await
            .unwrap_err(),
        FetchError::BadUrl(_)
    ));
}

/// However this server is spelt, the fetcher never connects to it, even with loopback
/// allowed; a redirect from an allowed server to it is refused too.
#[tokio::test]
async fn this_server_is_never_contacted_by_any_spelling() {
    let (port, seen) = server("127.0.0.1:0").await;
    let (other, other_seen) = server("127.0.0.1:0").await;
    let me: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let f = Fetcher::new(FetchConfig {
        allow: vec!["127.0.0.0/8".into(), "::1/128".into(), "0.0.0.0/32".into()],
        timeout: Duration::from_millis(800),
        origin: Some(
            remixd_domain::ServerOrigin::new(&format!("http://127.0.0.1:{port}"), Some(me))
                .unwrap(),
        ),
        ..FetchConfig::default()
    })
    .unwrap();
    for url in [
        format!("http://127.0.0.1:{port}/png"),
        format!("HTTP://127.0.0.1:{port}/png"),
        format!("http://127.1:{port}/png"),
        format!("http://127.0.0.1.:{port}/png"),
        format!("http://2130706433:{port}/png"),
        format!("http://0.0.0.0:{port}/png"),
        format!("http://[::1]:{port}/png"),
        format!("http://[::ffff:127.0.0.1]:{port}/png"),
        format!("http://localhost:{port}/png"),
        format!("http://LocalHost.:{port}/png"),
        format!("http://127.0.0.1:{other}/to/http:~~localhost:{port}~png"),
        format!("http://127.0.0.1:{other}/to/http:~~127.1:{port}~png"),
    ] {
        let e = f.download(&url, 1000).await.unwrap_err();
        assert!(matches!(e, FetchError::Blocked { .. }), "{url}: {e:?}");
        assert!(e.to_string().contains("this server itself"), "{url}: {e}");
    }
    assert_eq!(
        seen.0.load(Ordering::SeqCst),
        0,
        "this server saw no request"
    );
    assert_eq!(
        other_seen.0.load(Ordering::SeqCst),
        2,
        "only the two redirects"
    );
    // Other loopback servers stay reachable.
    assert!(f
        .download(&format!("http://127.0.0.1:{other}/png"), 1000)
        .await
        .is_ok());
}

/// Downloads in parallel under one shared budget cannot overshoot it together.
#[tokio::test]
async fn a_shared_budget_bounds_parallel_downloads_together() {
    let (port, _) = server("127.0.0.1:0").await;
    let f = Fetcher::new(FetchConfig {
        allow: vec!["127.0.0.1/32".into()],
        timeout: Duration::from_secs(2),
        ..FetchConfig::default()
    })
    .unwrap();
    // Two bodies of 300 000 bytes, each within its own cap of 1 MB, but not both
    // within a shared 400 000: at least one is refused (both, when their chunks
    // interleave past the budget), and never are both read whole.
    let budget = remixd_fetch::SharedBudget::new(400_000);
    let url = format!("http://127.0.0.1:{port}/big");
    let (a, b) = tokio::join!(
        f.download_shared(&url, 1_000_000, Some(&budget)),
        f.download_shared(&url, 1_000_000, Some(&budget)),
    );
    let errors: Vec<_> = [&a, &b]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert!(!errors.is_empty(), "both were read whole");
    for e in &errors {
        assert_eq!(**e, FetchError::GroupTooLarge { limit: 400_000 });
    }
    assert_eq!(
        errors[0].to_string(),
        "is too large: with the other images of its field it is over 400000 bytes"
    );
    // One after the other: the first fits, the second is refused from its length.
    let budget = remixd_fetch::SharedBudget::new(400_000);
    assert_eq!(
        f.download_shared(&url, 1_000_000, Some(&budget))
            .await
            .unwrap()
            .len(),
        300_000
    );
    assert_eq!(
        f.download_shared(&url, 1_000_000, Some(&budget))
            .await
            .unwrap_err(),
        FetchError::GroupTooLarge { limit: 400_000 }
    );
    // Without the shared budget both succeed.
    assert!(f.download(&url, 1_000_000).await.is_ok());
}
