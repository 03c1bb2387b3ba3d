//! Input images at fetch time: the per-task pixel budget, truncated files, EXIF
//! orientation, and a task using every image slot with large 16-bit PNGs.

use crate::common;

use std::io::Cursor;
use std::time::Duration;

use common::TestServer;
use image::ImageEncoder;
use remixd_testkit::{samples, ImageServer};
use serde_json::json;

fn png16(w: u32, h: u32) -> Vec<u8> {
    let img = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(w, h, |x, y| {
        image::Rgb([(x * 40) as u16, (y * 60) as u16, 0x8000])
    });
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb16(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[tokio::test]
async fn a_task_over_its_pixel_budget_fails_naming_the_image_that_went_over() {
    let srv = TestServer::start_with(|s| {
        s.fetch.max_pixels = 200_000;
        s.fetch.max_task_pixels = 600_000;
    })
    .await;
    let img = ImageServer::start().await;
    img.put("a.png", samples::png(400, 400, [90, 60, 30]), "image/png");
    let before = srv.api.balance().await;
    let a = img.url("a.png");
    let id = srv
        .api
        .create_ok(&remixd_testkit::task_body(
            &a,
            &a,
            json!({"reference_mask_urls": a, "image_urls": [a, a]}),
        ))
        .await;
    let d = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(
        (d["state"].as_str(), d["failCode"].as_str()),
        (Some("fail"), Some("422")),
        "{d}"
    );
    assert_eq!(
        d["failMsg"],
        "input.image_urls[0] brings the task's images to 640000 pixels, above the limit of 600000 pixels for all images of a task together"
    );
    assert_eq!(srv.api.balance().await, before, "refunded");
    // Within the budget the same images work.
    let id = srv
        .api
        .create_ok(&remixd_testkit::task_body(
            &a,
            &a,
            json!({"image_urls": [a]}),
        ))
        .await;
    let d = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "success", "{d}");
    srv.stop().await;
}

#[tokio::test]
async fn truncated_inputs_fail_the_task_at_fetch_time() {
    let srv = TestServer::start().await;
    let img = ImageServer::start().await;
    let jpeg = samples::jpeg(64, 48);
    img.put("cut.jpg", jpeg[..jpeg.len() * 2 / 3].to_vec(), "image/jpeg");
    let webp = samples::COFFEE_WEBP;
    img.put("cut.webp", webp[..webp.len() - 100].to_vec(), "image/webp");
    for (field, body) in [
        (
            "input.image_url",
            remixd_testkit::task_body(&img.url("cut.jpg"), &img.url("astronaut.webp"), json!({})),
        ),
        (
            "input.image_urls[1]",
            img.sample_task(json!({"image_urls": [img.url("coffee.webp"), img.url("cut.webp")]})),
        ),
    ] {
        let id = srv.api.create_ok(&body).await;
        let d = srv.api.wait_done(&id, Duration::from_secs(30)).await;
        assert_eq!(d["failCode"], "422", "{d}");
        let msg = d["failMsg"].as_str().unwrap();
        assert!(msg.starts_with(&format!("{field} is truncated: ")), "{msg}");
        // Failed while fetching: the engine never saw it.
        assert_eq!(d["progress"].as_i64().unwrap_or(0), 0, "{d}");
    }
    srv.stop().await;
}

#[tokio::test]
async fn a_rotated_phone_photo_is_used_upright() {
    // Stored 600×200, red left and blue right, with EXIF orientation 6: upright it is
    // 200×600, red on top. With strength 1, no style and an all-black mask (no
    // character), the preview's result is the base cover-cropped to the square: red
    // above blue if the orientation was applied, red beside blue if not.
    let srv = TestServer::start().await;
    let img = ImageServer::start().await;
    let stored = image::RgbImage::from_fn(600, 200, |x, _| {
        image::Rgb(if x < 300 {
            [230, 20, 20]
        } else {
            [20, 20, 230]
        })
    });
    // A big-endian TIFF block with one entry: Orientation (0x0112, SHORT, 1) = 6.
    let exif = b"MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0".to_vec();
    let mut jpeg = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90);
    enc.set_exif_metadata(exif).unwrap();
    enc.write_image(stored.as_raw(), 600, 200, image::ExtendedColorType::Rgb8)
        .unwrap();
    img.put("phone.jpg", jpeg, "image/jpeg");
    img.put("none.png", samples::png(64, 64, [0, 0, 0]), "image/png");
    let id = srv
        .api
        .create_ok(&remixd_testkit::task_body(
            &img.url("phone.jpg"),
            &img.url("astronaut.webp"),
            json!({"reference_mask_urls": img.url("none.png"), "strength": 1.0}),
        ))
        .await;
    let d = srv.api.wait_done(&id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "success", "{d}");
    let result: serde_json::Value =
        serde_json::from_str(d["resultJson"].as_str().unwrap()).unwrap();
    let url = result["resultUrls"][0].as_str().unwrap();
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    let out = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(out.dimensions(), (512, 512));
    let red = |p: &image::Rgb<u8>| p[0] > 150 && p[2] < 100;
    let blue = |p: &image::Rgb<u8>| p[2] > 150 && p[0] < 100;
    for x in [40, 256, 470] {
        assert!(
            red(out.get_pixel(x, 60)),
            "top at x={x}: {:?}",
            out.get_pixel(x, 60)
        );
        assert!(
            blue(out.get_pixel(x, 450)),
            "bottom at x={x}: {:?}",
            out.get_pixel(x, 450)
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn every_slot_with_a_large_16_bit_png_succeeds_one_decode_at_a_time() {
    let srv = TestServer::start_with(|s| {
        s.worker.decode_concurrency = 1;
        s.engine.concurrency = 2;
    })
    .await;
    let img = ImageServer::start().await;
    img.put("big.png", png16(1600, 1200), "image/png");
    let big = img.url("big.png");
    let styles: Vec<_> = (0..10).map(|_| big.clone()).collect();
    let body = remixd_testkit::task_body(
        &big,
        &big,
        json!({"reference_mask_urls": big, "image_urls": styles}),
    );
    let ids = futures::future::join_all((0..3).map(|_| srv.api.create_ok(&body))).await;
    for id in ids {
        let d = srv.api.wait_done(&id, Duration::from_secs(120)).await;
        assert_eq!(d["state"], "success", "{d}");
    }
    srv.stop().await;
}
