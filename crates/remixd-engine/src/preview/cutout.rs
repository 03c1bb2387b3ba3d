//! The character layer: the alpha matte, the cut-out, and where it lands in the frame.
//!
//! The matte is the job's mask (stretched to the reference's size when the two differ)
//! or, without a mask, a soft ellipse around the reference's centre, which catches a
//! centred subject and fades out the corners where backgrounds usually are. The
//! reference and matte are cropped to the matte's bounding box, scaled so the character
//! stands about 60% of the frame's height, and placed at the lower centre, nudged by
//! the image's seed so the images of one task differ.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::frame::Frame;
use super::resize;
use crate::Job;

/// Alpha at or below this (of 255) counts as background when finding the bounding box,
/// so the faint tail of a soft matte does not inflate the cut-out.
const ALPHA_THRESHOLD: u8 = 8;
/// The character's height as a fraction of the frame's.
const HEIGHT_FRACTION: f64 = 0.6;
/// Gap between the character's feet and the bottom edge, as a fraction of the height.
const BOTTOM_MARGIN: f64 = 0.02;
/// Seed jitter of the position: ± this fraction of the frame's width / height.
const JITTER_X: f64 = 0.08;
const JITTER_Y: f64 = 0.03;
/// The elliptical matte: radii as fractions of the reference's width and height, and
/// the normalised radius where the fade to transparent starts.
const ELLIPSE_RX: f32 = 0.42;
const ELLIPSE_RY: f32 = 0.48;
const ELLIPSE_SOLID: f32 = 0.75;

/// The character, cut out and scaled to its size in the frame: straight (not
/// premultiplied) RGBA, `w`×`h`.
#[derive(Debug, Clone)]
pub(crate) struct Cutout {
    pub(crate) w: u32,
    pub(crate) h: u32,
    pub(crate) rgba: Vec<u8>,
}

/// Where a cut-out's top-left corner goes in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) x: u32,
    pub(crate) y: u32,
}

/// The soft elliptical matte for a `w`×`h` reference: opaque inside 75% of the radii,
/// fading with a smoothstep to zero at the ellipse.
pub(crate) fn ellipse_matte(w: u32, h: u32) -> Vec<u8> {
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let (rx, ry) = (
        (ELLIPSE_RX * w as f32).max(0.5),
        (ELLIPSE_RY * h as f32).max(0.5),
    );
    // The squared horizontal term per column, computed once instead of per pixel.
    let col: Vec<f32> = (0..w)
        .map(|x| ((x as f32 + 0.5 - cx) / rx).powi(2))
        .collect();
    let mut out = Vec::with_capacity(w as usize * h as usize);
    for y in 0..h {
        let dy2 = ((y as f32 + 0.5 - cy) / ry).powi(2);
        for &dx2 in &col {
            let r = (dx2 + dy2).sqrt();
            let t = ((1.0 - r) / (1.0 - ELLIPSE_SOLID)).clamp(0.0, 1.0);
            let a = t * t * (3.0 - 2.0 * t);
            out.push((a * 255.0 + 0.5) as u8);
        }
    }
    out
}

/// The matte at the reference's resolution: the mask when given, else the ellipse.
pub(crate) fn matte(job: &Job) -> Vec<u8> {
    let (w, h) = job.character.dimensions();
    match &job.mask {
        Some(mask) if mask.dimensions() == (w, h) => mask.as_raw().clone(),
        Some(mask) => resize::stretch_gray(mask.as_raw(), mask.dimensions(), (w, h)),
        None => ellipse_matte(w, h),
    }
}

/// The bounding box `(left, top, width, height)` of the pixels above the threshold,
/// or `None` when there are none (an all-black mask: no character).
pub(crate) fn bounding_box(matte: &[u8], w: u32, h: u32) -> Option<(u32, u32, u32, u32)> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    if w == 0 {
        return None;
    }
    for (y, row) in matte.chunks_exact(w as usize).take(h as usize).enumerate() {
        let Some(first) = row.iter().position(|&a| a > ALPHA_THRESHOLD) else {
            continue;
        };
        let last = row
            .iter()
            .rposition(|&a| a > ALPHA_THRESHOLD)
            .unwrap_or(first);
        x0 = x0.min(first as u32);
        x1 = x1.max(last as u32);
        y0 = y0.min(y as u32);
        y1 = y1.max(y as u32);
    }
    (x0 != u32::MAX).then(|| (x0, y0, x1 - x0 + 1, y1 - y0 + 1))
}

/// The size of the cut-out in a `fw`×`fh` frame: 60% of the frame's height with the
/// box's aspect ratio, narrowed (keeping the aspect) when that would overflow the width.
pub(crate) fn scaled_size(box_w: u32, box_h: u32, fw: u32, fh: u32) -> (u32, u32) {
    let mut scale = HEIGHT_FRACTION * fh as f64 / box_h as f64;
    if box_w as f64 * scale > fw as f64 {
        scale = fw as f64 / box_w as f64;
    }
    let w = ((box_w as f64 * scale).round() as u32).clamp(1, fw.max(1));
    let h = ((box_h as f64 * scale).round() as u32).clamp(1, fh.max(1));
    (w, h)
}

/// Cuts the character out of the job's reference with `matte` (from [`matte`]) and
/// scales it for a `fw`×`fh` frame. `None` when the matte is empty or the reference
/// has no pixels.
pub(crate) fn cut_out(job: &Job, matte: &[u8], fw: u32, fh: u32) -> Option<Cutout> {
    let (cw, ch) = job.character.dimensions();
    if cw == 0 || ch == 0 || fw == 0 || fh == 0 {
        return None;
    }
    let (bx, by, bw, bh) = bounding_box(matte, cw, ch)?;
    // Interleave colour and matte over the box only; the rest of the reference is
    // never looked at again.
    let src = job.character.as_raw();
    let mut rgba = Vec::with_capacity(bw as usize * bh as usize * 4);
    for y in by..by + bh {
        let row = y as usize * cw as usize;
        for x in bx..bx + bw {
            let i = row + x as usize;
            rgba.extend_from_slice(&src[i * 3..i * 3 + 3]);
            rgba.push(matte[i]);
        }
    }
    let (w, h) = scaled_size(bw, bh, fw, fh);
    let rgba = resize::stretch_rgba(
        &rgba,
        (bw, bh),
        (w, h),
        resize::algorithm(job.rendering_speed),
    );
    Some(Cutout { w, h, rgba })
}

/// The character's mean colour (0..=255), weighted by the matte so the background
/// around it does not count; the plain mean when the matte is empty, mid-grey when the
/// reference has no pixels. Sampled on a grid, which is plenty for a mean.
pub(crate) fn mean_colour(job: &Job, matte: &[u8]) -> [f32; 3] {
    let (w, h) = job.character.dimensions();
    let step = super::colour::sample_step(w, h, 65_536);
    let src = job.character.as_raw();
    let (mut weighted, mut weight) = ([0.0f64; 3], 0.0f64);
    let (mut plain, mut count) = ([0.0f64; 3], 0.0f64);
    for y in (0..h as usize).step_by(step) {
        for x in (0..w as usize).step_by(step) {
            let i = y * w as usize + x;
            let a = matte[i] as f64;
            for c in 0..3 {
                let v = src[i * 3 + c] as f64;
                weighted[c] += v * a;
                plain[c] += v;
            }
            weight += a;
            count += 1.0;
        }
    }
    if weight > 0.0 {
        weighted.map(|s| (s / weight) as f32)
    } else if count > 0.0 {
        plain.map(|s| (s / count) as f32)
    } else {
        [128.0; 3]
    }
}

/// The cut-out's position for image seed `seed`: horizontally centred and standing near
/// the bottom edge, moved by up to ±8% of the width and ±3% of the height, and kept
/// inside the frame.
pub(crate) fn placement(cut: &Cutout, fw: u32, fh: u32, seed: u64) -> Placement {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let jx: f64 = rng.gen_range(-JITTER_X..=JITTER_X);
    let jy: f64 = rng.gen_range(-JITTER_Y..=JITTER_Y);
    let (fw, fh) = (fw as f64, fh as f64);
    let x = (fw - cut.w as f64) / 2.0 + jx * fw;
    let y = fh * (1.0 - BOTTOM_MARGIN) - cut.h as f64 + jy * fh;
    Placement {
        x: x.round().clamp(0.0, (fw - cut.w as f64).max(0.0)) as u32,
        y: y.round().clamp(0.0, (fh - cut.h as f64).max(0.0)) as u32,
    }
}

/// Alpha-blends the cut-out, placed at `at` in the image, over the frame's band of
/// rows. Only the cut-out's rectangle is touched, and where alpha is 0 the frame's
/// value is left bit for bit as it was.
pub(crate) fn composite(frame: &mut Frame, cut: &Cutout, at: Placement) {
    let fw = frame.w;
    let x0 = at.x as usize;
    let w = (cut.w as usize).min(fw.saturating_sub(x0));
    // The cut-out's rows that fall inside the band, in image coordinates.
    let top = (at.y as usize).max(frame.y0);
    let bottom = (at.y as usize + cut.h as usize).min(frame.y0 + frame.h);
    for (c, plane) in frame.planes.iter_mut().enumerate() {
        for y in top..bottom {
            let src = &cut.rgba[(y - at.y as usize) * cut.w as usize * 4..][..w * 4];
            let dst = &mut plane[(y - frame.y0) * fw + x0..][..w];
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                if s[3] != 0 {
                    *d += (s[c] as f32 - *d) * (s[3] as f32 * (1.0 / 255.0));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, RgbImage};

    fn job_with(character: RgbImage, mask: Option<GrayImage>) -> Job {
        Job {
            task_id: "t".into(),
            base: RgbImage::new(4, 4),
            character,
            mask,
            style_images: vec![],
            prompt: String::new(),
            negative_prompt: String::new(),
            expand_prompt: false,
            size: Default::default(),
            num_images: Default::default(),
            seed: remixd_domain::Seed::new(1).unwrap(),
            strength: Default::default(),
            style: Default::default(),
            rendering_speed: Default::default(),
            upstream: Default::default(),
        }
    }

    #[test]
    fn ellipse_is_opaque_at_the_centre_and_clear_at_the_corners() {
        let m = ellipse_matte(100, 60);
        assert_eq!(m[30 * 100 + 50], 255);
        for (x, y) in [(0, 0), (99, 0), (0, 59), (99, 59), (2, 30), (97, 30)] {
            assert_eq!(m[y * 100 + x], 0, "({x},{y})");
        }
        // Soft: some values strictly between.
        assert!(m.iter().any(|&a| a > 20 && a < 235));
        assert_eq!(ellipse_matte(1, 1), vec![255]);
    }

    #[test]
    fn bounding_box_ignores_the_faint_tail() {
        let mut m = vec![0u8; 10 * 8];
        m[2 * 10 + 3] = 200;
        m[5 * 10 + 7] = 255;
        m[7 * 10 + 9] = ALPHA_THRESHOLD; // at the threshold: background
        assert_eq!(bounding_box(&m, 10, 8), Some((3, 2, 5, 4)));
        assert_eq!(bounding_box(&[0; 12], 4, 3), None);
        assert_eq!(bounding_box(&[], 0, 0), None);
    }

    #[test]
    fn scaled_size_keeps_aspect_and_fits() {
        assert_eq!(scaled_size(100, 200, 1000, 1000), (300, 600));
        // Very wide: clamped to the frame width, aspect kept.
        assert_eq!(scaled_size(1000, 10, 512, 512), (512, 5));
        assert_eq!(scaled_size(1, 1, 1, 1), (1, 1));
    }

    #[test]
    fn mask_of_another_size_is_stretched() {
        let mut mask = GrayImage::new(10, 10);
        for y in 0..10 {
            for x in 5..10 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let job = job_with(RgbImage::new(40, 20), Some(mask));
        let m = matte(&job);
        assert_eq!(m.len(), 40 * 20);
        let (x, _, w, h) = bounding_box(&m, 40, 20).unwrap();
        // The white right half of the mask covers the right half of the reference (its
        // edge softened by the stretch over about one mask pixel, 4 reference pixels).
        assert!((17..=21).contains(&x), "{x}");
        assert_eq!((x + w, h), (40, 20));
    }

    #[test]
    fn mean_colour_follows_the_matte() {
        let mut character = RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 255]));
        let mut mask = GrayImage::new(8, 8);
        for y in 0..8 {
            for x in 0..4 {
                character.put_pixel(x, y, image::Rgb([250, 10, 0]));
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let job = job_with(character, Some(mask));
        assert_eq!(mean_colour(&job, &matte(&job)), [250.0, 10.0, 0.0]);
        // An empty matte falls back to the whole image's mean.
        assert_eq!(mean_colour(&job, &[0; 64]), [125.0, 5.0, 127.5]);
        let empty = job_with(RgbImage::new(0, 0), None);
        assert_eq!(mean_colour(&empty, &[]), [128.0; 3]);
    }

    #[test]
    fn placement_is_seeded_centred_and_inside() {
        let cut = Cutout {
            w: 300,
            h: 600,
            rgba: vec![],
        };
        let a = placement(&cut, 1000, 1000, 7);
        assert_eq!(a, placement(&cut, 1000, 1000, 7));
        let others: Vec<_> = (8..16).map(|s| placement(&cut, 1000, 1000, s)).collect();
        assert!(others.iter().any(|p| *p != a));
        for p in others.iter().chain([&a]) {
            let cx = p.x as i64 + 150;
            assert!((cx - 500).abs() <= 80, "{p:?}");
            let bottom = p.y as i64 + 600;
            assert!((950..=1000).contains(&bottom), "{p:?}");
        }
        // Too big for the frame: pinned inside, no underflow.
        let big = Cutout {
            w: 50,
            h: 50,
            rgba: vec![],
        };
        assert_eq!(placement(&big, 50, 50, 3), Placement { x: 0, y: 0 });
    }

    #[test]
    fn composite_blends_only_where_alpha_is_set() {
        let mut frame = Frame::from_planes(4, 3, [vec![10.0; 12], vec![10.0; 12], vec![10.0; 12]]);
        let cut = Cutout {
            w: 2,
            h: 1,
            rgba: vec![200, 100, 0, 255, 50, 50, 50, 0],
        };
        composite(&mut frame, &cut, Placement { x: 1, y: 1 });
        assert_eq!(frame.pixel(1, 1), [200.0, 100.0, 0.0]);
        assert_eq!(frame.pixel(2, 1), [10.0; 3]);
        assert_eq!(frame.pixel(0, 0), [10.0; 3]);
        // Half alpha: half way.
        let half = Cutout {
            w: 1,
            h: 1,
            rgba: vec![110, 10, 10, 51],
        };
        composite(&mut frame, &half, Placement { x: 0, y: 0 });
        assert!(
            (frame.pixel(0, 0)[0] - 30.0).abs() < 1e-4,
            "{:?}",
            frame.pixel(0, 0)
        );
        // Clipped at the frame's right edge without panicking.
        composite(&mut frame, &cut, Placement { x: 3, y: 2 });
        assert_eq!(frame.pixel(3, 2), [200.0, 100.0, 0.0]);
    }

    #[test]
    fn composite_into_a_band_uses_image_rows() {
        // A 1×3 cut-out (red, green, blue rows) at image rows 4..7, drawn into a band
        // holding image rows 5..7: only its last two rows land, at the band's rows 0, 1.
        let cut = Cutout {
            w: 1,
            h: 3,
            rgba: vec![255, 0, 0, 255, 0, 255, 0, 255, 0, 0, 255, 255],
        };
        let mut band = Frame::from_planes(2, 2, [vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]]);
        band.y0 = 5;
        composite(&mut band, &cut, Placement { x: 1, y: 4 });
        assert_eq!(band.pixel(1, 0), [0.0, 255.0, 0.0]);
        assert_eq!(band.pixel(1, 1), [0.0, 0.0, 255.0]);
        assert_eq!(band.pixel(0, 0), [0.0; 3]);
        // A band the cut-out does not reach is untouched.
        band.y0 = 9;
        let before = band.clone();
        composite(&mut band, &cut, Placement { x: 0, y: 4 });
        assert_eq!(band, before);
    }
}
