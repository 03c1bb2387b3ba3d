//! The `style` looks: FICTION's posterised, ink-lined illustration and REALISTIC's mild
//! photographic grade. (AUTO applies neither.)
//!
//! Both work in place on the frame's planes, a row at a time over contiguous slices so
//! the compiler can vectorise the inner loops.

use super::frame::{clamp_255, Frame, ROUNDING_MAGIC};

/// FICTION: quantisation levels per channel. Five levels (0, 64, 128, 191, 255) give
/// flat poster-like areas while keeping hues recognisable.
const LEVELS: f32 = 5.0;
/// FICTION: ink lines keep this fraction of the flat colour underneath, so lines are
/// dark but tinted by their area, like a coloured outline rather than pure black.
const INK: f32 = 0.3;
/// FICTION: squared Sobel magnitude (on 0..=255 luma) above which a pixel is inked.
/// After the [1 2 1] blur, a clean step of Δ levels peaks at a magnitude of 3Δ, so 110
/// inks steps of about 37 levels and more: object outlines, not texture or JPEG noise.
const EDGE_SQ: f32 = 110.0 * 110.0;

/// REALISTIC: how far the per-channel tone curve moves towards a smoothstep S-curve
/// (0 = identity, 1 = the full smoothstep, slope 1.5 at mid-grey).
const CONTRAST: f32 = 0.3;
/// REALISTIC: per-channel gains for a slight warmth.
const WARMTH: [f32; 3] = [1.035, 1.005, 0.95];
/// REALISTIC: how much the corners darken, and where (squared normalised radius) the
/// vignette starts.
const VIGNETTE: f32 = 0.22;
const VIGNETTE_START: f32 = 0.3;

fn smoothstep(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// A [1 2 1]/4 blur of one plane in both directions (edges clamped), in place with
/// `tmp` (same size) as scratch. It removes single-pixel noise so posterisation gives
/// clean areas and Sobel finds outlines, not grain.
fn blur121(plane: &mut [f32], tmp: &mut [f32], w: usize, h: usize) {
    for (s, t) in plane.chunks_exact(w).zip(tmp.chunks_exact_mut(w)) {
        if w == 1 {
            t.copy_from_slice(s);
            continue;
        }
        t[0] = (3.0 * s[0] + s[1]) * 0.25;
        t[w - 1] = (3.0 * s[w - 1] + s[w - 2]) * 0.25;
        for ((t, s), (l, r)) in t[1..w - 1]
            .iter_mut()
            .zip(&s[1..w - 1])
            .zip(s.iter().zip(&s[2..]))
        {
            *t = (l + 2.0 * s + r) * 0.25;
        }
    }
    for y in 0..h {
        let up = &tmp[y.saturating_sub(1) * w..][..w];
        let mid = &tmp[y * w..][..w];
        let down = &tmp[(y + 1).min(h - 1) * w..][..w];
        for (((o, u), m), d) in plane[y * w..][..w].iter_mut().zip(up).zip(mid).zip(down) {
            *o = (u + 2.0 * m + d) * 0.25;
        }
    }
}

/// Writes into `ink` the factor for each pixel of row `y`: [`INK`] where the 3×3 Sobel
/// gradient of the luma `l` is strong, 1 elsewhere (edges clamped). `scratch` holds
/// two rows.
///
/// The Sobel kernels are separable, so the row is done in two passes over flat rows
/// (vertical sums and differences, then their horizontal combinations), loops the
/// compiler vectorises, rather than nine reads per pixel.
fn ink_row(l: &[f32], w: usize, h: usize, y: usize, scratch: &mut [f32], ink: &mut [f32]) {
    let up = &l[y.saturating_sub(1) * w..][..w];
    let mid = &l[y * w..][..w];
    let down = &l[(y + 1).min(h - 1) * w..][..w];
    let (sum, diff) = scratch[..2 * w].split_at_mut(w);
    for ((((s, d), u), m), dn) in sum
        .iter_mut()
        .zip(diff.iter_mut())
        .zip(up)
        .zip(mid)
        .zip(down)
    {
        *s = u + 2.0 * m + dn;
        *d = dn - u;
    }
    let strong = |gx: f32, gy: f32| {
        if gx * gx + gy * gy > EDGE_SQ {
            INK
        } else {
            1.0
        }
    };
    if w >= 3 {
        let inner = ink[1..w - 1]
            .iter_mut()
            .zip(sum.iter().zip(&sum[2..]))
            .zip(diff.iter().zip(&diff[1..]).zip(&diff[2..]));
        for ((k, (sl, sr)), ((dl, dm), dr)) in inner {
            *k = strong(sr - sl, dl + 2.0 * dm + dr);
        }
    }
    // The two ends, with the neighbour outside the row replaced by the end itself.
    let at = |xm: usize, x: usize, xp: usize| {
        strong(sum[xp] - sum[xm], diff[xm] + 2.0 * diff[x] + diff[xp])
    };
    ink[0] = at(0, 0, 1.min(w - 1));
    ink[w - 1] = at(w.saturating_sub(2), w - 1, w - 1);
}

/// FICTION: smooth, posterise every channel to [`LEVELS`] values, and ink strong
/// luminance edges. The result has at most 2×[`LEVELS`] distinct values per channel.
/// `scratch` is working memory, kept by the caller from band to band.
pub(crate) fn fiction(frame: &mut Frame, scratch: &mut Vec<f32>) {
    let (w, h) = (frame.w, frame.h);
    if w == 0 || h == 0 {
        return;
    }
    scratch.resize(w * h + 3 * w, 0.0);
    let (luma, rest) = scratch.split_at_mut(w * h);
    let (rows, ink) = rest.split_at_mut(2 * w);
    for plane in &mut frame.planes {
        blur121(plane, luma, w, h);
    }
    // Rec. 601 luma of the smoothed frame.
    let [r, g, b] = &frame.planes;
    for (((l, r), g), b) in luma.iter_mut().zip(r).zip(g).zip(b) {
        *l = 0.299 * r + 0.587 * g + 0.114 * b;
    }
    let step = 255.0 / (LEVELS - 1.0);
    for y in 0..h {
        ink_row(luma, w, h, y, rows, ink);
        for plane in &mut frame.planes {
            for (v, k) in plane[y * w..][..w].iter_mut().zip(&*ink) {
                // Nearest level, rounded with the magic constant (see `to_u8`).
                let x = clamp_255(*v) * (1.0 / step);
                *v = ((x + ROUNDING_MAGIC) - ROUNDING_MAGIC) * step * k;
            }
        }
    }
}

/// REALISTIC: a gentle S-curve per channel, a slight warm balance, and a soft vignette
/// centred on the image, which is `image_h` rows tall (the frame may be a band of it).
pub(crate) fn realistic(frame: &mut Frame, image_h: usize) {
    let w = frame.w;
    if w == 0 || frame.h == 0 {
        return;
    }
    // Squared normalised distance from the centre, split per axis so the per-pixel work
    // is one add: 0 at the centre, 1 in the corners.
    let axis = |i: usize, n: usize| {
        let c = n as f32 / 2.0;
        ((i as f32 + 0.5 - c) / c).powi(2) * 0.5
    };
    let ax: Vec<f32> = (0..w).map(|x| axis(x, w)).collect();
    let mut vignette = vec![0.0f32; w];
    for y in 0..frame.h {
        let dy = axis(frame.y0 + y, image_h.max(1));
        for (v, &dx) in vignette.iter_mut().zip(&ax) {
            let t = (dx + dy - VIGNETTE_START) / (1.0 - VIGNETTE_START);
            *v = 255.0 * (1.0 - VIGNETTE * smoothstep(t));
        }
        for (plane, warmth) in frame.planes.iter_mut().zip(WARMTH) {
            for (p, v) in plane[y * w..][..w].iter_mut().zip(&vignette) {
                let x = (*p * (1.0 / 255.0)).clamp(0.0, 1.0);
                let curved = x + CONTRAST * (x * x * (3.0 - 2.0 * x) - x);
                *p = (curved * warmth).min(1.0) * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A smooth diagonal gradient with a bright square in the middle.
    fn test_frame(w: usize, h: usize) -> Frame {
        let mut planes = [Vec::new(), Vec::new(), Vec::new()];
        for y in 0..h {
            for x in 0..w {
                let inside = (w / 4..3 * w / 4).contains(&x) && (h / 4..3 * h / 4).contains(&y);
                let g = (x + y) as f32 / (w + h) as f32 * 200.0;
                planes[0].push(if inside { 250.0 } else { g });
                planes[1].push(g);
                planes[2].push(255.0 - g);
            }
        }
        Frame::from_planes(w, h, planes)
    }

    fn flat(w: usize, h: usize, v: f32) -> Frame {
        Frame::from_planes(w, h, [vec![v; w * h], vec![v; w * h], vec![v; w * h]])
    }

    #[test]
    fn blur_keeps_flat_areas_and_softens_steps() {
        let mut tmp = vec![0.0; 20];
        let mut plane = vec![7.0f32; 20];
        blur121(&mut plane, &mut tmp, 5, 4);
        assert_eq!(plane, vec![7.0; 20]);
        let mut step = vec![0.0, 0.0, 100.0, 100.0];
        blur121(&mut step, &mut tmp[..4], 4, 1);
        assert_eq!(step, [0.0, 25.0, 75.0, 100.0]);
        // One pixel wide or tall planes do not index out of bounds.
        let mut one = vec![3.0];
        blur121(&mut one, &mut tmp[..1], 1, 1);
        assert_eq!(one, [3.0]);
        let mut column = vec![0.0, 4.0, 8.0];
        blur121(&mut column, &mut tmp[..3], 1, 3);
        assert_eq!(column, [1.0, 4.0, 7.0]);
    }

    #[test]
    fn sobel_finds_the_square_outline_only() {
        let (w, h) = (40, 40);
        let f = test_frame(w, h);
        let [r, g, b] = &f.planes;
        let l: Vec<f32> = (0..w * h)
            .map(|i| 0.299 * r[i] + 0.587 * g[i] + 0.114 * b[i])
            .collect();
        let mut ink = vec![0.0; w];
        let mut rows = vec![0.0; 2 * w];
        ink_row(&l, w, h, 20, &mut rows, &mut ink);
        // On the square's left edge, not inside it nor in the smooth gradient.
        assert_eq!(ink[10], INK);
        assert_eq!(ink[20], 1.0);
        assert_eq!(ink[3], 1.0);
        ink_row(&l, w, h, 5, &mut rows, &mut ink);
        assert!(ink.iter().all(|&k| k == 1.0));
        // Degenerate sizes.
        let mut one = [0.0];
        ink_row(&[5.0], 1, 1, 0, &mut rows, &mut one);
        assert_eq!(one, [1.0]);
    }

    #[test]
    fn fiction_posterises_and_inks() {
        let (w, h) = (64, 48);
        let mut f = test_frame(w, h);
        fiction(&mut f, &mut Vec::new());
        for (c, plane) in f.planes.iter().enumerate() {
            let levels: BTreeSet<u32> = plane.iter().map(|&v| (v + 0.5) as u32).collect();
            assert!(
                levels.len() <= 2 * LEVELS as usize,
                "channel {c}: {levels:?}"
            );
        }
        // The square's outline is inked: darker than both sides.
        let px = |x: usize, y: usize| f.pixel(x, y)[0];
        assert!(
            px(16, 24) < px(14, 24).min(px(24, 24)),
            "{} {} {}",
            px(14, 24),
            px(16, 24),
            px(24, 24)
        );
        let mut tiny = flat(1, 1, 100.0);
        fiction(&mut tiny, &mut Vec::new());
        assert_eq!(tiny.pixel(0, 0), [127.5; 3]);
    }

    #[test]
    fn realistic_darkens_corners_and_warms() {
        let mut f = flat(32, 32, 128.0);
        realistic(&mut f, 32);
        let (centre, corner) = (f.pixel(16, 16), f.pixel(0, 0));
        assert!(corner[1] < centre[1] - 15.0, "{corner:?} vs {centre:?}");
        assert!(centre[0] > centre[2], "warm: red over blue {centre:?}");
        // The S-curve darkens shadows and brightens highlights (no vignette at the
        // centre of a 2×1 frame).
        let tone = vec![50.0, 205.0];
        let mut tones = Frame::from_planes(2, 1, [tone.clone(), tone.clone(), tone]);
        realistic(&mut tones, 1);
        assert!(
            tones.pixel(0, 0)[1] < 50.0 && tones.pixel(1, 0)[1] > 205.0,
            "{tones:?}"
        );
        realistic(&mut flat(1, 1, 3.0), 1);
    }
}
