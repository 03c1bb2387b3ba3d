//! File storage in an S3-compatible bucket, against a real S3-protocol server on
//! loopback (remixd_testkit::s3): what the local directory does, under a prefix, and
//! presigned GET URLs that the server checks.

use std::time::Duration;

use bytes::Bytes;
use remixd_store::blobs::S3Options;
use remixd_store::Blobs;
use remixd_testkit::s3::S3Server;

fn options(s3: &S3Server) -> S3Options {
    S3Options {
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key: Some(s3.access_key.clone()),
        secret: Some(s3.secret.clone()),
        path_style: true,
    }
}

#[tokio::test]
async fn a_bucket_stores_what_a_directory_does() {
    let s3 = S3Server::start("remixd").await;
    let blobs = Blobs::open_with(&s3.url("node/files"), &options(&s3)).unwrap();
    blobs.probe().await.expect("the bucket answers");
    assert!(blobs
        .list_all()
        .await
        .unwrap()
        .contains(&"readyz-probe".to_string()));

    let png = Bytes::from_static(b"\x89PNG not really");
    blobs
        .put("results/t1/tok/0.png", png.clone())
        .await
        .unwrap();
    blobs
        .put("results/t2/tok/0.png", png.clone())
        .await
        .unwrap();
    blobs
        .put("inputs/t1/base", Bytes::from_static(b"b"))
        .await
        .unwrap();
    assert_eq!(blobs.get("results/t1/tok/0.png").await.unwrap(), png);
    // The objects sit under the prefix in the bucket.
    assert!(s3
        .root
        .join("remixd/node/files/results/t1/tok/0.png")
        .exists());
    assert!(matches!(
        blobs.get("results/none").await,
        Err(remixd_store::BlobError::NotFound)
    ));
    let mut dirs = blobs.list_dirs("results").await.unwrap();
    dirs.sort();
    assert_eq!(dirs, ["t1", "t2"]);
    blobs.delete_prefix("inputs/t1").await.unwrap();
    blobs.delete("results/t2/tok/0.png").await.unwrap();
    blobs
        .delete("results/t2/tok/0.png")
        .await
        .expect("deleting twice is fine");
    assert_eq!(
        blobs.list_all().await.unwrap(),
        ["readyz-probe", "results/t1/tok/0.png"]
    );
    assert!(blobs.put("../escape", png.clone()).await.is_err());
}

#[tokio::test]
async fn presigned_urls_read_one_object_until_they_expire() {
    let s3 = S3Server::start("remixd").await;
    let blobs = Blobs::open_with(&s3.url("p"), &options(&s3)).unwrap();
    assert!(blobs.can_presign());
    blobs
        .put("results/t/tok/0.png", Bytes::from_static(b"image bytes"))
        .await
        .unwrap();
    let url = blobs
        .presigned_get("results/t/tok/0.png", Duration::from_secs(600))
        .await
        .unwrap()
        .expect("a bucket signs");
    assert!(url.as_str().starts_with(&s3.endpoint), "{url}");
    let base = blobs
        .presigned_base()
        .await
        .unwrap()
        .expect("a bucket's base");
    assert_eq!(base.as_str(), format!("{}/remixd/p/", s3.endpoint));
    assert!(url.as_str().starts_with(base.as_str()));
    let got = reqwest::get(url.clone()).await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"image bytes");

    // Another key under the same signature is refused, as is a tampered signature.
    let other = url.as_str().replace("0.png", "1.png");
    assert_eq!(reqwest::get(other).await.unwrap().status(), 403);
    let mut tampered = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let mut v = v.into_owned();
            if k == "X-Amz-Signature" {
                // One hex digit changed.
                let last = v.pop().unwrap();
                v.push(if last == '0' { '1' } else { '0' });
            }
            (k.into_owned(), v)
        })
        .collect();
    tampered.query_pairs_mut().clear().extend_pairs(pairs);
    assert_eq!(reqwest::get(tampered).await.unwrap().status(), 403);

    // A directory cannot sign.
    let dir = tempfile::tempdir().unwrap();
    let local = Blobs::open(&format!("file://{}", dir.path().display())).unwrap();
    assert!(!local.can_presign());
    assert_eq!(local.presigned_base().await.unwrap(), None);
    assert_eq!(
        local
            .presigned_get("results/t/tok/0.png", Duration::from_secs(1))
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn wrong_credentials_are_an_error_not_an_empty_bucket() {
    let s3 = S3Server::start("remixd").await;
    let mut bad = options(&s3);
    bad.secret = Some("not-the-secret".into());
    let blobs = Blobs::open_with(&s3.url(""), &bad).unwrap();
    assert!(blobs.probe().await.is_err());
    assert!(Blobs::open_with("s3://", &options(&s3)).is_err());
    assert!(Blobs::open_with("s3://b/../x", &options(&s3)).is_err());
}
