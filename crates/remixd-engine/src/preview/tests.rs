//! Tests of the whole preview pipeline and the engine around it: the properties
//! ENGINES.md promises (determinism, sizes, strength, mask, styles, speeds), the
//! engine's behaviour (progress, cancellation), and inputs at the edges.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::{GrayImage, Luma, Rgb, RgbImage};
use remixd_domain::{ImageSize, NumImages, RenderingSpeed, Seed, Strength, Style};
use tokio_util::sync::CancellationToken;

use super::*;

/// A file of the shared sample photos: `/work/shared` sits beside the checkout, or
/// `PREVIEW_TESTDATA` names the folder (for running a built test binary elsewhere).
fn testdata(name: &str) -> String {
    let dir = std::env::var("PREVIEW_TESTDATA").unwrap_or_else(|_| {
        format!(
            "{}/../../../shared/testdata/images",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    format!("{dir}/{name}")
}

fn sample(name: &str) -> RgbImage {
    let path = testdata(name);
    image::open(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .to_rgb8()
}

fn sample_mask() -> GrayImage {
    let path = testdata("astronaut_mask.png");
    image::open(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .to_luma8()
}

fn job(base: RgbImage, character: RgbImage, mask: Option<GrayImage>) -> Job {
    Job {
        task_id: "test".into(),
        base,
        character,
        mask,
        style_images: vec![],
        prompt: "a character in a scene".into(),
        negative_prompt: String::new(),
        expand_prompt: false,
        size: ImageSize::Square,
        num_images: NumImages::new(1).unwrap(),
        seed: Seed::new(42).unwrap(),
        strength: Strength::new(1.0).unwrap(),
        style: Style::Auto,
        rendering_speed: RenderingSpeed::Balanced,
        upstream: Default::default(),
    }
}

/// The astronaut (with its mask) over the coffee cup, the samples' intended use.
fn photo_job() -> Job {
    job(
        sample("coffee.png"),
        sample("astronaut.png"),
        Some(sample_mask()),
    )
}

/// A smooth synthetic base with some structure, `w`×`h`.
fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let fx = x as f32 / w.max(1) as f32;
        let fy = y as f32 / h.max(1) as f32;
        Rgb([
            (fx * 255.0) as u8,
            (fy * 255.0) as u8,
            (((fx + fy) * 0.5) * 200.0) as u8 + 20,
        ])
    })
}

/// The placed matte of image `index`: alpha per frame pixel (0 where no character).
fn placed_alpha(job: &Job, index: u32) -> Vec<u8> {
    let prepared = Prepared::new(job);
    let (w, h) = (prepared.w as usize, prepared.h as usize);
    let mut alpha = vec![0u8; w * h];
    if let Some((cut, at)) = prepared.placement(index) {
        for y in 0..cut.h as usize {
            for x in 0..cut.w as usize {
                let (fx, fy) = (at.x as usize + x, at.y as usize + y);
                if fx < w && fy < h {
                    alpha[fy * w + fx] = cut.rgba[(y * cut.w as usize + x) * 4 + 3];
                }
            }
        }
    }
    alpha
}

fn pixels(img: &RgbImage) -> impl Iterator<Item = [u8; 3]> + '_ {
    img.pixels().map(|p| p.0)
}

fn mean(img: &RgbImage) -> [f64; 3] {
    let mut s = [0.0f64; 3];
    for p in pixels(img) {
        for c in 0..3 {
            s[c] += p[c] as f64;
        }
    }
    let n = (img.width() * img.height()) as f64;
    s.map(|v| v / n)
}

fn dist(a: [f64; 3], b: [f64; 3]) -> f64 {
    (0..3).map(|c| (a[c] - b[c]).powi(2)).sum::<f64>().sqrt()
}

fn recorder() -> (Progress, Arc<Mutex<Vec<u8>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    (Arc::new(move |p| sink.lock().unwrap().push(p)), seen)
}

fn photo_job_with(style: Style) -> Job {
    let mut j = photo_job();
    j.style = style;
    j.strength = Strength::new(0.7).unwrap();
    j.style_images = vec![sample("rocket.jpg")];
    j
}

#[test]
fn same_job_same_bytes_other_seed_other_pixels() {
    for style in [Style::Auto, Style::Fiction, Style::Realistic] {
        let j = photo_job_with(style);
        let a = encode_png(&render(&j, 0));
        let b = encode_png(&render(&j.clone(), 0));
        assert_eq!(a, b, "{style:?}");
        let mut other = j.clone();
        other.seed = Seed::new(4242).unwrap();
        let differing = pixels(&render(&j, 0))
            .zip(pixels(&render(&other, 0)))
            .filter(|(p, q)| p != q)
            .count();
        assert!(differing > 1000, "{style:?}: {differing} pixels differ");
    }
}

#[test]
fn image_i_uses_seed_plus_i() {
    let mut j = photo_job();
    let second = render(&j, 1);
    assert_ne!(second, render(&j, 0));
    j.seed = Seed::new(43).unwrap();
    assert_eq!(second, render(&j, 0));
}

#[test]
fn prompts_do_not_change_pixels() {
    let j = photo_job();
    let mut k = j.clone();
    k.prompt = "something else entirely".into();
    k.negative_prompt = "blurry".into();
    k.expand_prompt = true;
    assert_eq!(render(&j, 0), render(&k, 0));
}

#[test]
fn every_size_has_its_dimensions() {
    for size in ImageSize::ALL {
        let mut j = job(gradient(64, 48), gradient(20, 30), None);
        j.size = size;
        j.style = Style::Fiction;
        let img = render(&j, 0);
        assert_eq!(img.dimensions(), size.dimensions(), "{size:?}");
        let png = image::load_from_memory(&encode_png(&img)).unwrap();
        assert_eq!((png.width(), png.height()), size.dimensions());
    }
}

#[test]
fn full_strength_auto_keeps_the_base_bit_for_bit() {
    // A base already at the target size is the reference with no resizing in between;
    // coffee.png (600×400) is cover-cropped and resized by the pipeline's own resizer.
    let exact = job(gradient(512, 512), sample("astronaut.png"), None);
    let mut resized = photo_job();
    resized.size = ImageSize::Landscape4_3;
    for (j, expected) in [
        (exact.clone(), exact.base.clone()),
        (resized.clone(), {
            let (w, h) = resized.size.dimensions();
            let alg = resize::algorithm(resized.rendering_speed);
            let raw = resize::cover_rgb(
                resized.base.as_raw(),
                resized.base.dimensions(),
                (w, h),
                alg,
            );
            RgbImage::from_raw(w, h, raw).unwrap()
        }),
    ] {
        let out = render(&j, 0);
        let alpha = placed_alpha(&j, 0);
        let (mut kept, mut changed_under_character) = (0, 0);
        for ((o, e), &a) in pixels(&out).zip(pixels(&expected)).zip(&alpha) {
            if a == 0 {
                assert_eq!(o, e);
                kept += 1;
            } else if o != e {
                changed_under_character += 1;
            }
        }
        let n = alpha.len();
        assert!(
            kept > n / 2,
            "most of the frame is background: {kept} of {n}"
        );
        assert!(
            changed_under_character > n / 20,
            "the character is drawn: {changed_under_character}"
        );
    }
}

#[test]
fn lower_strength_washes_the_base_towards_the_character_colour() {
    let wash = [200u8, 30, 60];
    let base = gradient(512, 512);
    let mut j = job(base.clone(), RgbImage::from_pixel(64, 64, Rgb(wash)), None);
    let mut last = f64::INFINITY;
    for s in [1.0, 0.7, 0.4, 0.1] {
        j.strength = Strength::new(s).unwrap();
        let out = render(&j, 0);
        let alpha = placed_alpha(&j, 0);
        let mut total = 0.0;
        let mut count = 0.0;
        for ((o, b), &a) in pixels(&out).zip(pixels(&base)).zip(&alpha) {
            if a != 0 {
                continue;
            }
            for c in 0..3 {
                let want = b[c] as f64 * s + wash[c] as f64 * (1.0 - s);
                assert!((o[c] as f64 - want).abs() <= 1.0, "s={s}: {o:?} from {b:?}");
                total += (o[c] as f64 - wash[c] as f64).abs();
            }
            count += 1.0;
        }
        let avg = total / count;
        assert!(
            avg < last,
            "s={s}: distance to the wash {avg} should shrink (was {last})"
        );
        last = avg;
    }
}

#[test]
fn style_images_colour_the_wash() {
    let style = RgbImage::from_fn(40, 40, |x, _| Rgb([20, 40 + x as u8, 220]));
    let mut j = job(
        RgbImage::from_pixel(512, 512, Rgb([250, 250, 250])),
        gradient(30, 30),
        None,
    );
    j.strength = Strength::new(0.1).unwrap();
    let plain = render(&j, 0);
    j.style_images = vec![style];
    let styled = render(&j, 0);
    // The corner is far from the character: washed 90% towards the style's blue.
    let corner = styled.get_pixel(0, 0).0;
    assert!(corner[2] > corner[0] + 100, "{corner:?}");
    assert_ne!(plain.get_pixel(0, 0), styled.get_pixel(0, 0));
}

/// A reference that is green everywhere except a red rectangle, with a mask that is
/// white exactly on the rectangle: if the mask were ignored, green would show.
fn rectangle_job() -> (Job, (u32, u32)) {
    let (rx, ry, rw, rh) = (100u32, 150u32, 100u32, 300u32);
    let inside = |x: u32, y: u32| (rx..rx + rw).contains(&x) && (ry..ry + rh).contains(&y);
    let character = RgbImage::from_fn(512, 512, |x, y| {
        if inside(x, y) {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 255, 0])
        }
    });
    let mask = GrayImage::from_fn(512, 512, |x, y| Luma([if inside(x, y) { 255 } else { 0 }]));
    let base = RgbImage::from_pixel(512, 512, Rgb([0, 0, 255]));
    (job(base, character, Some(mask)), (rw, rh))
}

#[test]
fn the_mask_decides_what_is_character() {
    let (j, (rw, rh)) = rectangle_job();
    for speed in [
        RenderingSpeed::Turbo,
        RenderingSpeed::Balanced,
        RenderingSpeed::Quality,
    ] {
        let mut j = j.clone();
        j.rendering_speed = speed;
        let out = render(&j, 0);
        let alpha = placed_alpha(&j, 0);
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
        for (i, (p, &a)) in pixels(&out).zip(&alpha).enumerate() {
            assert_eq!(p[1], 0, "no green from outside the mask ({speed:?})");
            if a == 0 {
                assert_eq!(p, [0, 0, 255], "pixel {i} outside the placed mask is base");
            }
            if p != [0, 0, 255] {
                let (x, y) = (i as u32 % 512, i as u32 / 512);
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
        // The character's shape is the mask's rectangle: 60% of the height, 1:3.
        let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
        assert!((h as f64 - 0.6 * 512.0).abs() <= 2.0, "height {h}");
        let aspect = w as f64 / h as f64;
        assert!(
            (aspect - rw as f64 / rh as f64).abs() < 0.01,
            "aspect {aspect}"
        );
        // Lower centre: the bottom near the bottom edge, the middle near the middle.
        assert!(y1 >= 512 - 30, "bottom at {y1}");
        assert!(
            ((x0 + x1) as f64 / 2.0 - 256.0).abs() <= 0.08 * 512.0 + 1.0,
            "x {x0}..{x1}"
        );
    }
    // The same reference without its mask shows green (the ellipse takes it in), so the
    // assertions above do depend on the mask.
    let mut unmasked = j;
    unmasked.mask = None;
    assert!(pixels(&render(&unmasked, 0)).any(|p| p[1] > 100));
}

#[test]
fn an_all_black_mask_means_no_character() {
    let mut j = job(
        gradient(512, 512),
        sample("astronaut.png"),
        Some(GrayImage::new(512, 512)),
    );
    assert_eq!(render(&j, 0), j.base);
    // ...and the styled base with a style.
    j.style = Style::Fiction;
    let mut no_char = j.clone();
    no_char.character = RgbImage::new(0, 0);
    assert_eq!(render(&j, 0), render(&no_char, 0));
}

#[test]
fn fiction_posterises_the_background() {
    let auto = photo_job();
    let mut fiction = photo_job();
    fiction.style = Style::Fiction;
    let (a, f) = (render(&auto, 0), render(&fiction, 0));
    assert_ne!(a, f);
    let alpha = placed_alpha(&fiction, 0);
    for c in 0..3 {
        let levels = |img: &RgbImage| -> BTreeSet<u8> {
            pixels(img)
                .zip(&alpha)
                .filter(|(_, &al)| al == 0)
                .map(|(p, _)| p[c])
                .collect()
        };
        let (la, lf) = (levels(&a), levels(&f));
        assert!(la.len() > 100, "the photo has many levels: {}", la.len());
        assert!(lf.len() <= 10, "channel {c}: {lf:?}");
    }
}

#[test]
fn realistic_grades_gently() {
    let auto = photo_job();
    let mut real = photo_job();
    real.style = Style::Realistic;
    let (a, r) = (render(&auto, 0), render(&real, 0));
    assert_ne!(a, r);
    // Vignette: the corners darken noticeably, the centre barely.
    let luma = |img: &RgbImage, x: u32, y: u32| {
        let p = img.get_pixel(x, y).0;
        0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64
    };
    let corner_drop = luma(&a, 2, 2) - luma(&r, 2, 2);
    assert!(corner_drop > 5.0, "corner darkened by {corner_drop}");
    // Mild: the frame as a whole stays close to the original.
    assert!(dist(mean(&a), mean(&r)) < 25.0);
}

#[test]
fn style_images_pull_the_mean_colour_towards_theirs() {
    let plain = photo_job();
    let mut styled = photo_job();
    // Two warm images, pooled: orange gradients with some spread.
    styled.style_images = vec![
        RgbImage::from_fn(80, 60, |x, y| {
            Rgb([200 + (x % 50) as u8, 100 + y as u8, 30])
        }),
        RgbImage::from_fn(300, 200, |x, _| Rgb([230, 140 + (x % 60) as u8, 60])),
    ];
    let mut target = Stats::default();
    for img in &styled.style_images {
        colour::sample_into(
            &mut target,
            img.as_raw(),
            img.width(),
            img.height(),
            1,
            |p| p,
        );
    }
    let t = target.mean().map(|v| v as f64);
    let (before, after) = (mean(&render(&plain, 0)), mean(&render(&styled, 0)));
    let (d0, d1) = (dist(before, t), dist(after, t));
    assert!(d1 < d0 * 0.4, "mean {before:?} -> {after:?}, target {t:?}");
}

#[test]
fn drawing_in_bands_matches_drawing_the_whole_image() {
    // The reference: the same stages run once over the whole image. Bands must give
    // the same bytes, which checks FICTION's extra rows and REALISTIC's vignette rows.
    for style in [Style::Auto, Style::Fiction, Style::Realistic] {
        for size in [ImageSize::Square, ImageSize::Portrait16_9] {
            let mut j = photo_job_with(style);
            j.size = size;
            let p = Prepared::new(&j);
            let (w, h) = (p.w as usize, p.h as usize);
            let placed = p.placement(0);
            let mut whole = Frame::new(w);
            p.compose(&mut whole, 0..h, placed);
            let target = p.style_lab.as_ref().unwrap();
            TransferLut::new(&p.composited_stats(placed), target).apply(&mut whole);
            match style {
                Style::Auto => {}
                Style::Fiction => style::fiction(&mut whole, &mut Vec::new()),
                Style::Realistic => style::realistic(&mut whole, h),
            }
            let mut want = vec![0u8; w * h * 3];
            whole.write_rgb8(0..h, &mut want);
            assert_eq!(render(&j, 0).into_raw(), want, "{style:?} {size:?}");
        }
    }
}

#[test]
fn speeds_resample_differently() {
    let mut j = job(
        sample("chelsea.png"),
        sample("astronaut.png"),
        Some(sample_mask()),
    );
    j.size = ImageSize::Landscape16_9;
    let outs: Vec<RgbImage> = [
        RenderingSpeed::Turbo,
        RenderingSpeed::Balanced,
        RenderingSpeed::Quality,
    ]
    .into_iter()
    .map(|speed| {
        let mut j = j.clone();
        j.rendering_speed = speed;
        render(&j, 0)
    })
    .collect();
    for (a, b) in [(0, 1), (1, 2), (0, 2)] {
        let differing = pixels(&outs[a])
            .zip(pixels(&outs[b]))
            .filter(|(p, q)| p != q)
            .count();
        assert!(
            differing > 1000,
            "speeds {a} and {b} differ in {differing} pixels"
        );
        // ...slightly: the same picture.
        assert!(dist(mean(&outs[a]), mean(&outs[b])) < 2.0);
    }
}

#[test]
fn degenerate_inputs_do_not_panic() {
    let tiny = RgbImage::from_pixel(1, 1, Rgb([9, 99, 199]));
    let cases: Vec<Job> = vec![
        job(tiny.clone(), tiny.clone(), None),
        job(
            tiny.clone(),
            tiny.clone(),
            Some(GrayImage::from_pixel(1, 1, Luma([255]))),
        ),
        // A mask of another size than the reference, and one of 1×1.
        job(
            gradient(300, 200),
            sample("astronaut.png"),
            Some(GrayImage::from_pixel(37, 91, Luma([255]))),
        ),
        job(
            gradient(300, 200),
            sample("astronaut.png"),
            Some(GrayImage::from_pixel(1, 1, Luma([200]))),
        ),
        // Extreme aspect ratios.
        job(gradient(2000, 1), gradient(1, 900), None),
        job(gradient(1, 700), gradient(1500, 2), None),
        // Empty images.
        job(
            RgbImage::new(0, 0),
            RgbImage::new(0, 0),
            Some(GrayImage::new(0, 0)),
        ),
        job(
            gradient(10, 10),
            gradient(10, 10),
            Some(GrayImage::new(0, 0)),
        ),
    ];
    for (i, mut j) in cases.into_iter().enumerate() {
        j.style_images = vec![tiny.clone(), RgbImage::new(0, 0)];
        for style in [Style::Auto, Style::Fiction, Style::Realistic] {
            for size in [ImageSize::Square, ImageSize::Portrait16_9] {
                j.style = style;
                j.size = size;
                j.strength = Strength::new(0.1).unwrap();
                let img = render(&j, 3);
                assert_eq!(img.dimensions(), size.dimensions(), "case {i}");
            }
        }
    }
    assert!(encode_png(&RgbImage::new(0, 0)).is_empty());
}

#[test]
fn a_mask_is_stretched_to_the_reference() {
    // A 64×64 mask, white on its right half, for a 512×512 reference: the character is
    // the reference's right half (red), never its left half (green).
    let character = RgbImage::from_fn(512, 512, |x, _| {
        if x >= 256 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 255, 0])
        }
    });
    let mask = GrayImage::from_fn(64, 64, |x, _| Luma([if x >= 32 { 255 } else { 0 }]));
    let j = job(
        RgbImage::from_pixel(512, 512, Rgb([0, 0, 255])),
        character,
        Some(mask),
    );
    let out = render(&j, 0);
    assert!(pixels(&out).any(|p| p == [255, 0, 0]));
    // Bilinear stretching softens the mask's edge over a few reference pixels, so a
    // trace of green may mix in there, but never solid green.
    assert!(pixels(&out).all(|p| p[1] < 128), "green leaked");
}

#[tokio::test]
async fn generate_returns_the_rendered_images_with_progress_to_100() {
    let mut j = photo_job();
    j.num_images = NumImages::new(3).unwrap();
    j.style = Style::Fiction;
    let engine = PreviewEngine::new(PreviewConfig::default());
    assert_eq!(engine.name(), "preview");
    engine.ready().await.unwrap();
    let (progress, seen) = recorder();
    let images = engine
        .generate(j.clone(), progress, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(images.len(), 3);
    for (i, img) in images.iter().enumerate() {
        assert_eq!(img.content_type, "image/png");
        assert_eq!((img.width, img.height), (512, 512));
        assert_eq!(img.bytes, encode_png(&render(&j, i as u32)), "image {i}");
    }
    assert_ne!(images[0].bytes, images[1].bytes);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.last(), Some(&100), "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {seen:?}"
    );
    assert!(seen.len() >= 4, "reports along the way: {seen:?}");
}

#[tokio::test]
async fn cancellation_is_prompt_even_with_a_long_delay() {
    let engine = PreviewEngine::new(PreviewConfig {
        delay_per_image: Duration::from_secs(30),
    });
    let cancel = CancellationToken::new();
    let (progress, seen) = recorder();
    let started = Instant::now();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
    });
    let result = engine.generate(photo_job(), progress, cancel).await;
    assert_eq!(result.unwrap_err(), EngineError::Cancelled);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(!seen.lock().unwrap().contains(&100));

    // Already cancelled: no work at all.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let (progress, seen) = recorder();
    let result = engine.generate(photo_job(), progress, cancel).await;
    assert_eq!(result.unwrap_err(), EngineError::Cancelled);
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn the_blocking_worker_stops_at_its_next_check() {
    // Without the async side's select: the worker itself notices the token in its delay.
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        trigger.cancel();
    });
    let (progress, _) = recorder();
    let started = Instant::now();
    let result = run_job(&photo_job(), Duration::from_secs(30), &progress, &cancel);
    assert_eq!(result.unwrap_err(), EngineError::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(2));
    t.join().unwrap();
}

#[test]
fn delay_is_applied_per_image() {
    let mut j = job(gradient(16, 16), gradient(8, 8), None);
    j.num_images = NumImages::new(2).unwrap();
    let (progress, _) = recorder();
    let started = Instant::now();
    let images = run_job(
        &j,
        Duration::from_millis(60),
        &progress,
        &CancellationToken::new(),
    )
    .unwrap();
    assert_eq!(images.len(), 2);
    assert!(started.elapsed() >= Duration::from_millis(120));
}

/// Reduces `img` as the worker does for `size` (Lanczos3, aspect kept, never enlarged).
fn reduced(img: &RgbImage, size: crate::WorkingSize) -> RgbImage {
    let (w, h) = img.dimensions();
    let (bw, bh, cover) = match size {
        crate::WorkingSize::Full => return img.clone(),
        crate::WorkingSize::Unused => return RgbImage::new(0, 0),
        crate::WorkingSize::Cover(bw, bh) => (bw, bh, true),
        crate::WorkingSize::Fit(bw, bh) => (bw, bh, false),
    };
    let (sx, sy) = (bw as f64 / w as f64, bh as f64 / h as f64);
    let s = if cover { sx.max(sy) } else { sx.min(sy) };
    if s >= 1.0 {
        return img.clone();
    }
    let dst = (
        ((w as f64 * s).round() as u32).max(1),
        ((h as f64 * s).round() as u32).max(1),
    );
    let raw = resize::stretch_rgba(
        &img.pixels()
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect::<Vec<_>>(),
        (w, h),
        dst,
        resize::algorithm(RenderingSpeed::Quality),
    );
    RgbImage::from_raw(
        dst.0,
        dst.1,
        raw.chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
    )
    .unwrap()
}

#[test]
fn inputs_reduced_to_the_working_sizes_render_almost_the_same_image() {
    // Large inputs (the samples blown up 4×), rendered as given and reduced to the
    // working sizes: the worker's reduction must not visibly change the result.
    let up = |img: RgbImage| {
        let (w, h) = img.dimensions();
        resize::cover_resize(&img, (w * 4, h * 4), RenderingSpeed::Quality)
    };
    let mut full = job(up(sample("coffee.png")), up(sample("astronaut.png")), None);
    full.size = ImageSize::SquareHd;
    full.style_images = vec![up(sample("chelsea.png"))];
    full.strength = Strength::new(0.6).unwrap();
    let out = full.size.dimensions();
    let engine = PreviewEngine::default();
    let mut small = full.clone();
    small.base = reduced(&full.base, engine.working_size(crate::InputRole::Base, out));
    small.character = reduced(
        &full.character,
        engine.working_size(crate::InputRole::Character, out),
    );
    small.style_images = vec![reduced(
        &full.style_images[0],
        engine.working_size(crate::InputRole::Style, out),
    )];
    assert!(small.base.width() * small.base.height() * 2 < full.base.width() * full.base.height());
    assert_eq!(
        small.style_images[0]
            .width()
            .max(small.style_images[0].height()),
        256
    );

    let (a, b) = (render(&full, 0), render(&small, 0));
    assert_eq!(a.dimensions(), b.dimensions());
    let diff: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as u64)
        .sum();
    let mean = diff as f64 / a.as_raw().len() as f64;
    assert!(mean < 2.0, "mean difference {mean:.2} of 255");
}
