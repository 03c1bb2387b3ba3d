use std::time::Duration;

use image::Rgb;

use super::*;
use remixd_testkit::exif::{encode_with_exif, exif_orientation};

const COFFEE_WEBP: &[u8] = include_bytes!("../../../../assets/coffee.webp");
const MASK_PNG: &[u8] = include_bytes!("../../../../assets/astronaut_mask.png");

fn encode(img: &DynamicImage, f: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, f).unwrap();
    out.into_inner()
}

/// 40×20 as stored: the left half red, the right half blue.
fn halves() -> RgbImage {
    RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgb([230, 20, 20])
        } else {
            Rgb([20, 20, 230])
        }
    })
}

fn is_red(p: &Rgb<u8>) -> bool {
    p[0] > 150 && p[2] < 100
}

fn is_blue(p: &Rgb<u8>) -> bool {
    p[2] > 150 && p[0] < 100
}

#[test]
fn the_three_kinds_sniff_and_decode() {
    let img = DynamicImage::ImageRgb8(RgbImage::from_fn(7, 5, |x, y| {
        Rgb([x as u8 * 30, y as u8 * 40, 9])
    }));
    for (f, kind) in [
        (ImageFormat::Png, ImageKind::Png),
        (ImageFormat::Jpeg, ImageKind::Jpeg),
        (ImageFormat::WebP, ImageKind::Webp),
    ] {
        let bytes = encode(&img, f);
        assert_eq!(sniff(&bytes), Some(kind));
        assert_eq!(probe(&bytes, 100).unwrap(), (kind, 7, 5));
        let rgb = decode_rgb(&bytes, 100).unwrap();
        assert_eq!(rgb.dimensions(), (7, 5));
        assert_eq!(decode_luma(&bytes, 100).unwrap().dimensions(), (7, 5));
        assert!(matches!(
            probe(&bytes, 34),
            Err(FetchError::TooManyPixels {
                width: 7,
                height: 5,
                limit: 34
            })
        ));
    }
    assert_eq!(
        probe(b"GIF89a\x01\x00\x01\x00", 100).unwrap_err(),
        FetchError::NotImage
    );
    assert_eq!(probe(b"<html>", 100).unwrap_err(), FetchError::NotImage);
}

#[test]
fn a_decompression_bomb_header_is_refused_without_decoding() {
    // A real 1x1 PNG whose IHDR claims 100000 x 100000 (CRC fixed up).
    let mut png = encode(
        &DynamicImage::ImageRgb8(RgbImage::new(1, 1)),
        ImageFormat::Png,
    );
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = {
        let mut c = 0xffff_ffffu32;
        for &b in &png[12..29] {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    };
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    let e = decode_rgb(&png, 40_000_000).unwrap_err();
    assert_eq!(
        e,
        FetchError::TooManyPixels {
            width: 100_000,
            height: 100_000,
            limit: 40_000_000
        }
    );
    assert_eq!(
        e.to_string(),
        "has dimensions 100000x100000, above the limit of 40000000 pixels"
    );
}

#[test]
fn a_truncated_jpeg_is_refused_although_the_decoder_would_accept_it() {
    let jpeg = encode_with_exif(
        &RgbImage::from_fn(64, 48, |x, y| Rgb([x as u8 * 4, y as u8 * 5, 77])),
        ImageFormat::Jpeg,
        None,
    );
    let cut = &jpeg[..jpeg.len() * 2 / 3];
    // What the issue observed: the lenient decoder fills in the missing tail.
    assert!(image::load_from_memory_with_format(cut, ImageFormat::Jpeg).is_ok());
    let e = probe(cut, 1 << 20).unwrap_err();
    assert_eq!(
        e,
        FetchError::Truncated("the JPEG data ends before its end-of-image marker".into())
    );
    assert_eq!(
        e.to_string(),
        "is truncated: the JPEG data ends before its end-of-image marker"
    );
    assert!(matches!(
        decode_rgb(cut, 1 << 20),
        Err(FetchError::Truncated(_))
    ));
    // The whole file, and the whole file with bytes after its end, are fine.
    assert!(probe(&jpeg, 1 << 20).is_ok());
    let mut trailing = jpeg.clone();
    trailing.extend_from_slice(b"some phones append data here");
    assert!(probe(&trailing, 1 << 20).is_ok());
}

#[test]
fn an_end_marker_inside_the_exif_block_does_not_make_a_cut_jpeg_complete() {
    // EXIF data holding the bytes FF D9 (as an embedded thumbnail's end would).
    let mut exif = exif_orientation(1);
    exif.extend_from_slice(&[0xff, 0xd9, 0xff, 0xd9]);
    let jpeg = encode_with_exif(
        &RgbImage::from_fn(64, 48, |x, y| Rgb([x as u8, y as u8, 9])),
        ImageFormat::Jpeg,
        Some(exif),
    );
    assert!(probe(&jpeg, 1 << 20).is_ok());
    let cut = &jpeg[..jpeg.len() - 40];
    assert!(cut.windows(2).any(|w| w == [0xff, 0xd9]));
    assert!(matches!(probe(cut, 1 << 20), Err(FetchError::Truncated(_))));
}

#[test]
fn every_strict_prefix_of_each_kind_is_refused() {
    let jpeg = encode_with_exif(
        &RgbImage::from_fn(33, 17, |x, y| Rgb([x as u8 * 7, y as u8 * 13, 200])),
        ImageFormat::Jpeg,
        Some(exif_orientation(6)),
    );
    for (name, file) in [
        ("jpeg", jpeg.as_slice()),
        ("png", MASK_PNG),
        ("webp", COFFEE_WEBP),
    ] {
        assert!(probe(file, 1 << 24).is_ok(), "{name} whole");
        for len in 0..file.len() {
            assert!(
                probe(&file[..len], 1 << 24).is_err(),
                "{name} cut to {len} of {} bytes was accepted",
                file.len()
            );
        }
    }
    // Cut near the end, the reason is the truncation itself.
    for (file, why) in [
        (MASK_PNG, "the PNG data ends before its IEND chunk"),
        (
            COFFEE_WEBP,
            "the WebP data ends before the end its RIFF header announces",
        ),
    ] {
        let cut = &file[..file.len() - 5];
        assert_eq!(
            probe(cut, 1 << 24).unwrap_err(),
            FetchError::Truncated(why.into())
        );
        assert!(matches!(
            decode_rgb(cut, 1 << 24),
            Err(FetchError::Truncated(_))
        ));
    }
}

#[test]
fn exif_orientation_is_applied_in_every_format() {
    // Orientation 6: the stored image is shown turned 90° clockwise, so the stored
    // left half (red) becomes the top half of a 20×40 image.
    for f in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP] {
        let bytes = encode_with_exif(&halves(), f, Some(exif_orientation(6)));
        let (_, w, h) = probe(&bytes, 1 << 20).unwrap();
        assert_eq!(
            (w, h),
            (20, 40),
            "{f:?}: the reported size is the upright one"
        );
        let img = decode_rgb(&bytes, 1 << 20).unwrap();
        assert_eq!(img.dimensions(), (20, 40), "{f:?}");
        assert!(
            is_red(img.get_pixel(10, 5)),
            "{f:?}: {:?}",
            img.get_pixel(10, 5)
        );
        assert!(
            is_blue(img.get_pixel(10, 35)),
            "{f:?}: {:?}",
            img.get_pixel(10, 35)
        );
        let mask = decode_luma(&bytes, 1 << 20).unwrap();
        assert_eq!(mask.dimensions(), (20, 40), "{f:?}");

        // Without the tag the same pixels stay as stored.
        let plain = encode_with_exif(&halves(), f, None);
        let img = decode_rgb(&plain, 1 << 20).unwrap();
        assert_eq!(img.dimensions(), (40, 20));
        assert!(is_red(img.get_pixel(5, 10)) && is_blue(img.get_pixel(35, 10)));
    }
    // Orientation 8 turns the other way: red ends at the bottom.
    let bytes = encode_with_exif(&halves(), ImageFormat::Png, Some(exif_orientation(8)));
    let img = decode_rgb(&bytes, 1 << 20).unwrap();
    assert!(is_blue(img.get_pixel(10, 5)) && is_red(img.get_pixel(10, 35)));
    // The pixel limit applies to the upright size too (same count, but the message
    // says what the user sees).
    assert_eq!(
        probe(
            &encode_with_exif(&halves(), ImageFormat::Jpeg, Some(exif_orientation(6))),
            799
        )
        .unwrap_err(),
        FetchError::TooManyPixels {
            width: 20,
            height: 40,
            limit: 799
        }
    );
}

#[test]
fn sixteen_bit_pngs_decode_to_their_high_bytes() {
    let (w, h) = (300u32, 200u32);
    let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(w, h, |x, y| {
        image::Rgb([(x * 200) as u16, (y * 300) as u16, 0xabcd])
    });
    let rgba16 = image::ImageBuffer::<image::Rgba<u16>, _>::from_fn(w, h, |x, y| {
        image::Rgba([(x * 200) as u16, (y * 300) as u16, 0x1234, 0x8000])
    });
    let l16 = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(w, h, |x, _| {
        image::Luma([(x * 211) as u16])
    });
    for img in [
        DynamicImage::ImageRgb16(rgb16),
        DynamicImage::ImageRgba16(rgba16),
        DynamicImage::ImageLuma16(l16),
    ] {
        let bytes = encode(&img, ImageFormat::Png);
        let want = img.to_rgb8();
        let got = decode_rgb(&bytes, 1 << 20).unwrap();
        assert_eq!(got.dimensions(), (w, h));
        // `image` rounds (v / 257), the decoder's transformation keeps the high byte:
        // at most one step apart.
        for (a, b) in got.pixels().zip(want.pixels()) {
            for c in 0..3 {
                assert!(a[c].abs_diff(b[c]) <= 1, "{:?} vs {:?}", a, b);
            }
        }
        // Luma of the cut samples: each channel and the sum may each lose one step.
        let luma = decode_luma(&bytes, 1 << 20).unwrap();
        for (a, b) in luma.pixels().zip(img.to_luma8().pixels()) {
            assert!(a[0].abs_diff(b[0]) <= 2, "{:?} vs {:?}", a, b);
        }
    }
}

#[test]
fn reduce_targets_never_enlarge_and_keep_the_aspect() {
    assert_eq!(Reduce::Keep.target(6000, 4000), None);
    assert_eq!(
        Reduce::Cover(1024, 768).target(6000, 4000),
        Some((1152, 768))
    );
    assert_eq!(
        Reduce::Cover(1024, 1024).target(6000, 4000),
        Some((1536, 1024))
    );
    assert_eq!(
        Reduce::Fit(1024, 1024).target(6000, 4000),
        Some((1024, 683))
    );
    assert_eq!(Reduce::Fit(256, 256).target(300, 6000), Some((13, 256)));
    assert_eq!(Reduce::Fit(1024, 1024).target(800, 600), None);
    assert_eq!(Reduce::Cover(1024, 1024).target(800, 6000), None);
    assert_eq!(Reduce::Fit(10, 10).target(10_000, 1), Some((10, 1)));
    for (w, h) in [(1000, 999), (3001, 700), (4097, 4095), (600, 5000)] {
        let (cw, ch) = Reduce::Cover(512, 384).target(w, h).unwrap();
        assert!(
            cw >= 512 && ch >= 384 && cw <= w && ch <= h,
            "{w}x{h} -> {cw}x{ch}"
        );
    }
}

#[test]
fn decoding_reduces_the_upright_image_to_its_bound() {
    let big = RgbImage::from_fn(400, 200, |x, _| {
        if x < 200 {
            Rgb([230, 20, 20])
        } else {
            Rgb([20, 20, 230])
        }
    });
    for f in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
        let bytes = encode_with_exif(&big, f, Some(exif_orientation(6)));
        // Upright it is 200×400: fitting 50×100 is a quarter, covering 100×100 is half.
        let fit = decode_rgb_within(&bytes, 1 << 20, Reduce::Fit(50, 100)).unwrap();
        assert_eq!(fit.dimensions(), (50, 100), "{f:?}");
        assert!(is_red(fit.get_pixel(25, 10)) && is_blue(fit.get_pixel(25, 90)));
        let cover = decode_rgb_within(&bytes, 1 << 20, Reduce::Cover(100, 100)).unwrap();
        assert_eq!(cover.dimensions(), (100, 200), "{f:?}");
        let mask = decode_luma_within(&bytes, 1 << 20, Reduce::Fit(50, 100)).unwrap();
        assert_eq!(mask.dimensions(), (50, 100), "{f:?}");
        let kept = decode_rgb_within(&bytes, 1 << 20, Reduce::Fit(1000, 1000)).unwrap();
        assert_eq!(kept.dimensions(), (200, 400), "{f:?}: never enlarged");
    }
}

/// A PNG of noise, slow enough to decode that a burst of them overlaps.
fn noisy_png(side: u32) -> Vec<u8> {
    let mut s = 0x9e37_79b9u32;
    let img = RgbImage::from_fn(side, side, |_, _| {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        Rgb([s as u8, (s >> 8) as u8, (s >> 16) as u8])
    });
    encode(&DynamicImage::ImageRgb8(img), ImageFormat::Png)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gate_never_runs_more_decodes_than_its_limit() {
    let gate = DecodeGate::new(2);
    let bytes = Bytes::from(noisy_png(600));
    let decodes: Vec<_> = (0..12)
        .map(|_| {
            let (gate, bytes) = (gate.clone(), bytes.clone());
            tokio::spawn(async move { gate.rgb(bytes, 1 << 20, Reduce::Fit(64, 64)).await })
        })
        .collect();
    for d in decodes {
        assert_eq!(d.await.unwrap().unwrap().dimensions(), (64, 64));
    }
    assert!(
        (1..=2).contains(&gate.peak()),
        "peak {} with a limit of 2",
        gate.peak()
    );
    assert_eq!(gate.in_flight(), 0);

    // With work that surely overlaps, the bound is reached and never passed.
    for limit in [1, 3] {
        let gate = DecodeGate::new(limit);
        let seen = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs: Vec<_> = (0..10)
            .map(|_| {
                let (gate, seen, most) = (gate.clone(), seen.clone(), most.clone());
                tokio::spawn(async move {
                    gate.run(move || {
                        let now = seen.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(30));
                        seen.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                    .unwrap()
                })
            })
            .collect();
        for j in jobs {
            j.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), limit, "work seen at once");
        assert_eq!(gate.peak(), limit, "the gate's own count");
    }
}

#[tokio::test]
async fn a_panicking_decode_frees_its_permit() {
    let gate = DecodeGate::new(1);
    let e = gate.run(|| panic!("boom")).await.unwrap_err();
    assert!(matches!(e, FetchError::Decode(_)), "{e:?}");
    assert_eq!(gate.in_flight(), 0);
    assert_eq!(gate.run(|| 7).await.unwrap(), 7);
}

#[test]
fn the_task_budget_counts_every_image_and_names_none_itself() {
    let mut budget = TaskPixels::new(1000);
    budget.add(20, 20).unwrap();
    budget.add(20, 20).unwrap();
    let e = budget.add(15, 15).unwrap_err();
    assert_eq!(
        e,
        FetchError::TaskPixels {
            total: 1025,
            limit: 1000
        }
    );
    assert_eq!(
        format!("input.image_urls[3] {e}"),
        "input.image_urls[3] brings the task's images to 1025 pixels, above the limit of 1000 pixels for all images of a task together"
    );
}

/// An extended WebP (`VP8X` canvas) around a lossless frame of `frame` pixels.
fn extended_webp(canvas: (u32, u32), frame: (u32, u32)) -> Vec<u8> {
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(frame.0, frame.1, Rgb([9, 99, 199])));
    let simple = encode(&img, ImageFormat::WebP);
    // The simple file's only chunk is its frame (`VP8L`); keep it whole.
    let frame_chunk = &simple[12..];
    let mut vp8x = b"VP8X".to_vec();
    vp8x.extend_from_slice(&10u32.to_le_bytes());
    vp8x.extend_from_slice(&[0, 0, 0, 0]);
    vp8x.extend_from_slice(&(canvas.0 - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(canvas.1 - 1).to_le_bytes()[..3]);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&((4 + vp8x.len() + frame_chunk.len()) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&vp8x);
    out.extend_from_slice(frame_chunk);
    out
}

/// Found by the `image` fuzz target: image-webp sizes its buffers from the frame header
/// before it compares the frame with the canvas, so a tiny canvas (inside the pixel
/// limit) with a huge frame made a 543-byte file allocate 136 MiB. Such a file is
/// refused from its chunk headers; a frame that fits its canvas still decodes.
#[test]
fn a_webp_frame_larger_than_its_canvas_is_refused_before_decoding() {
    let found =
        include_bytes!("../../../../fuzz/regressions/image/webp-vp8-frame-larger-than-canvas.webp");
    match probe(found, 40_000_000) {
        Err(FetchError::Decode(m)) => assert!(m.contains("does not fit its 15x136 canvas"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(decode_rgb(found, 40_000_000).is_err());

    let fits = extended_webp((40, 30), (40, 30));
    assert_eq!(probe(&fits, 40_000_000).unwrap(), (ImageKind::Webp, 40, 30));
    assert_eq!(
        decode_rgb(&fits, 40_000_000).unwrap().dimensions(),
        (40, 30)
    );
    // The second find: a `VP8X` chunk declaring 9 bytes (the decoder reads its 10
    // anyway) with a 15×10 canvas and a 15631×7936 frame asked for 118 MiB.
    let short = include_bytes!(
        "../../../../fuzz/regressions/image/webp-vp8x-short-chunk-hides-canvas.webp"
    );
    match probe(short, 40_000_000) {
        Err(FetchError::Decode(m)) => {
            assert!(
                m.contains("15631x7936 frame does not fit its 15x10 canvas"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(decode_rgb(short, 40_000_000).is_err());
    let larger = extended_webp((40, 30), (400, 30));
    match probe(&larger, 40_000_000) {
        Err(FetchError::Decode(m)) => {
            assert!(
                m.contains("400x30 frame does not fit its 40x30 canvas"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
}
