//! Colour science for the preview engine: sRGB transfer curves, Oklab, per-channel
//! statistics, and the colour transfer that pulls a frame towards the style images.
//!
//! Oklab (Björn Ottosson, 2020) is used because its axes are close to perceptually
//! uniform, so matching mean and spread per axis moves lightness and hue the way an
//! eye expects, unlike the same statistics on raw RGB. The per-pixel Oklab round trip
//! needs six cube roots and powers, far too slow for a million pixels inside the time
//! budget, so the transfer is baked into a 33³ 3D lookup table over sRGB and applied
//! with tetrahedral interpolation, the way colour-grading tools do it.

use std::sync::OnceLock;

use super::frame::{Frame, ROUNDING_MAGIC};

/// Nodes per axis of the transfer LUT. 33 (a step of about 8 code values) keeps the
/// interpolation error under one code value for the smooth maps built here.
const LUT_N: usize = 33;

/// sRGB-encoded value in 0..=1 to linear light.
fn srgb_to_linear(c: f32) -> f32 {
    if c <= 0.040_45 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// Linear light in 0..=1 to an sRGB-encoded value in 0..=1.
fn linear_to_srgb(l: f32) -> f32 {
    if l <= 0.003_130_8 {
        l * 12.92
    } else {
        1.055 * l.powf(1.0 / 2.4) - 0.055
    }
}

/// Linear light for each 8-bit sRGB code, computed once.
fn linear_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| srgb_to_linear(i as f32 / 255.0)))
}

/// Linear light for an sRGB value on the 0..=255 scale (not necessarily an integer):
/// interpolates the 8-bit table, which is exact at the codes and off by far less than a
/// code value between them.
fn linear_from_255(v: f32) -> f32 {
    let t = linear_table();
    let v = v.clamp(0.0, 255.0);
    let i = (v as usize).min(254);
    let f = v - i as f32;
    t[i] + (t[i + 1] - t[i]) * f
}

/// Linear sRGB (0..=1) to Oklab `[L, a, b]`.
pub(crate) fn linear_to_oklab([r, g, b]: [f32; 3]) -> [f32; 3] {
    let l = 0.412_221_47 * r + 0.536_332_55 * g + 0.051_445_995 * b;
    let m = 0.211_903_5 * r + 0.680_699_5 * g + 0.107_396_96 * b;
    let s = 0.088_302_46 * r + 0.281_718_85 * g + 0.629_978_7 * b;
    let (l, m, s) = (l.cbrt(), m.cbrt(), s.cbrt());
    [
        0.210_454_26 * l + 0.793_617_8 * m - 0.004_072_047 * s,
        1.977_998_5 * l - 2.428_592_2 * m + 0.450_593_7 * s,
        0.025_904_037 * l + 0.782_771_77 * m - 0.808_675_77 * s,
    ]
}

/// Oklab `[L, a, b]` to linear sRGB (may fall outside 0..=1 for out-of-gamut colours).
pub(crate) fn oklab_to_linear([lo, a, b]: [f32; 3]) -> [f32; 3] {
    let l = lo + 0.396_337_78 * a + 0.215_803_76 * b;
    let m = lo - 0.105_561_346 * a - 0.063_854_17 * b;
    let s = lo - 0.089_484_18 * a - 1.291_485_5 * b;
    let (l, m, s) = (l * l * l, m * m * m, s * s * s);
    [
        4.076_741_7 * l - 3.307_711_6 * m + 0.230_969_94 * s,
        -1.268_438 * l + 2.609_757_4 * m - 0.341_319_38 * s,
        -0.004_196_086_3 * l - 0.703_418_6 * m + 1.707_614_7 * s,
    ]
}

/// An sRGB colour on the 0..=255 scale to Oklab.
pub(crate) fn oklab_from_255([r, g, b]: [f32; 3]) -> [f32; 3] {
    linear_to_oklab([linear_from_255(r), linear_from_255(g), linear_from_255(b)])
}

/// Intervals of the linear-to-sRGB table.
const ENCODE_STEPS: usize = 4096;

/// sRGB (0..=255) at `ENCODE_STEPS + 1` evenly spaced linear values, computed once.
fn encode_table() -> &'static [f32] {
    static TABLE: OnceLock<Vec<f32>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=ENCODE_STEPS)
            .map(|i| linear_to_srgb(i as f32 / ENCODE_STEPS as f32) * 255.0)
            .collect()
    })
}

/// Linear light (clamped to 0..=1) to sRGB on the 0..=255 scale, interpolating the
/// table: off by less than 0.01 of a code value, and a fraction of the cost of `powf`,
/// which matters for the 36 000 nodes of a LUT.
fn srgb255_from_linear(l: f32) -> f32 {
    let t = encode_table();
    let x = l.clamp(0.0, 1.0) * ENCODE_STEPS as f32;
    let i = (x as usize).min(ENCODE_STEPS - 1);
    t[i] + (t[i + 1] - t[i]) * (x - i as f32)
}

/// Oklab to an sRGB colour on the 0..=255 scale, clipped to the gamut per channel.
pub(crate) fn oklab_to_255(lab: [f32; 3]) -> [f32; 3] {
    oklab_to_linear(lab).map(srgb255_from_linear)
}

/// Running mean and standard deviation per channel (sums in f64, so the order of a
/// few hundred thousand samples does not matter to the result's precision).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stats {
    n: f64,
    sum: [f64; 3],
    sum_sq: [f64; 3],
}

impl Stats {
    pub(crate) fn add(&mut self, v: [f32; 3]) {
        self.n += 1.0;
        for ((sum, sum_sq), x) in self.sum.iter_mut().zip(&mut self.sum_sq).zip(v) {
            let x = x as f64;
            *sum += x;
            *sum_sq += x * x;
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.n == 0.0
    }

    pub(crate) fn mean(&self) -> [f32; 3] {
        let n = self.n.max(1.0);
        self.sum.map(|s| (s / n) as f32)
    }

    pub(crate) fn std(&self) -> [f32; 3] {
        let n = self.n.max(1.0);
        std::array::from_fn(|c| {
            let m = self.sum[c] / n;
            ((self.sum_sq[c] / n - m * m).max(0.0)).sqrt() as f32
        })
    }
}

/// The sampling step that keeps about `budget` samples from a `w`×`h` image.
/// Subsampling on a fixed grid keeps the statistics deterministic and cheap.
pub(crate) fn sample_step(w: u32, h: u32, budget: u64) -> usize {
    let px = w as u64 * h as u64;
    let mut step = 1u64;
    while px / (step * step) > budget {
        step += 1;
    }
    step as usize
}

/// Adds every `step`-th pixel (in both directions) of an interleaved RGB8 buffer,
/// converted by `f`, to `stats`.
pub(crate) fn sample_into(
    stats: &mut Stats,
    data: &[u8],
    w: u32,
    h: u32,
    step: usize,
    f: impl Fn([f32; 3]) -> [f32; 3],
) {
    let (w, h) = (w as usize, h as usize);
    for y in (0..h).step_by(step) {
        let row = &data[y * w * 3..(y + 1) * w * 3];
        for px in row.chunks_exact(3).step_by(step) {
            stats.add(f([px[0] as f32, px[1] as f32, px[2] as f32]));
        }
    }
}

/// Adds every `step`-th pixel (in both directions) of a frame, converted to Oklab.
pub(crate) fn sample_frame(stats: &mut Stats, frame: &Frame, step: usize) {
    for y in (0..frame.h).step_by(step) {
        for x in (0..frame.w).step_by(step) {
            stats.add(oklab_from_255(frame.pixel(x, y)));
        }
    }
}

/// Limits on how much the spread of an Oklab axis may be scaled. A flat source (a
/// uniform background has almost no spread) would otherwise be stretched into noise,
/// and a flat style image would crush the frame to one colour.
const SPREAD_RATIO: (f32, f32) = (0.4, 2.5);

/// A colour transfer from `source` statistics to `target` statistics (both Oklab),
/// baked into a 3D LUT over sRGB 0..=255.
pub(crate) struct TransferLut {
    /// Node colours in `[r][g][b]` order, padded to four lanes so that a node is one
    /// aligned 16-byte read.
    nodes: Vec<[f32; 4]>,
}

/// Splits a LUT coordinate (node units) into the lower node's index, kept below the
/// last node so that index+1 exists, and the fraction towards the next node.
///
/// The floor is `x − 0.5` rounded with [`ROUNDING_MAGIC`], which vectorises where a
/// cast does not. Ties round to even, so an integer input may come out as the node
/// below with fraction 1: the same point on the same edge of the cube.
#[inline(always)]
fn node_split(x: f32) -> (u32, f32) {
    let x = min(max(x, 0.0), (LUT_N - 1) as f32);
    let i = ((x - 0.5) + ROUNDING_MAGIC)
        .to_bits()
        .wrapping_sub(ROUNDING_MAGIC.to_bits())
        .min(LUT_N as u32 - 2);
    (i, min(max(x - i as f32, 0.0), 1.0))
}

/// `f32::max` and `min` promise NaN handling that costs extra instructions in vector
/// code; no NaN reaches the LUT, so plain comparisons do.
#[inline(always)]
fn max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

#[inline(always)]
fn min(a: f32, b: f32) -> f32 {
    if a < b {
        a
    } else {
        b
    }
}

impl TransferLut {
    /// Maps each Oklab axis affinely so that the source's mean and standard deviation
    /// become the target's: `(x − μs) · clamp(σt/σs) + μt`.
    pub(crate) fn new(source: &Stats, target: &Stats) -> Self {
        let (ms, ss) = (source.mean(), source.std());
        let (mt, st) = (target.mean(), target.std());
        let gain: [f32; 3] = std::array::from_fn(|c| {
            if ss[c] <= 1e-6 {
                1.0
            } else {
                (st[c] / ss[c]).clamp(SPREAD_RATIO.0, SPREAD_RATIO.1)
            }
        });
        let step = 255.0 / (LUT_N - 1) as f32;
        let mut nodes = Vec::with_capacity(LUT_N * LUT_N * LUT_N);
        for r in 0..LUT_N {
            for g in 0..LUT_N {
                for b in 0..LUT_N {
                    let lab = oklab_from_255([r as f32 * step, g as f32 * step, b as f32 * step]);
                    let moved: [f32; 3] =
                        std::array::from_fn(|c| (lab[c] - ms[c]) * gain[c] + mt[c]);
                    let [r, g, b] = oklab_to_255(moved);
                    nodes.push([r, g, b, 0.0]);
                }
            }
        }
        Self { nodes }
    }

    /// Applies the LUT in place to a frame.
    ///
    /// Tetrahedral interpolation: the cube of nodes around a colour is split into six
    /// tetrahedra along its grey diagonal, and the colour is interpolated from the four
    /// corners of its own; half the reads and arithmetic of trilinear interpolation,
    /// exact on the grey axis, the usual choice for colour LUTs.
    ///
    /// Pixels go in blocks, in two passes: first the index and weight arithmetic for the
    /// whole block (plain loops over arrays, which vectorise), then the node reads and
    /// the blend, which cannot.
    pub(crate) fn apply(&self, frame: &mut Frame) {
        const N: usize = LUT_N;
        const R: u32 = (N * N) as u32;
        const G: u32 = N as u32;
        const B: u32 = 1;
        const BLOCK: usize = 256;
        let scale = (N - 1) as f32 / 255.0;
        let mut at = [0u32; BLOCK];
        let mut first = [0u32; BLOCK];
        let mut second = [0u32; BLOCK];
        let mut weights = [[0.0f32; BLOCK]; 3];
        let [rp, gp, bp] = &mut frame.planes;
        for ((r, g), b) in rp
            .chunks_mut(BLOCK)
            .zip(gp.chunks_mut(BLOCK))
            .zip(bp.chunks_mut(BLOCK))
        {
            let n = r.len();
            let (at, first, second) = (&mut at[..n], &mut first[..n], &mut second[..n]);
            let [hi, mid, lo] = &mut weights;
            let (hi, mid, lo) = (&mut hi[..n], &mut mid[..n], &mut lo[..n]);
            for j in 0..n {
                let (xi, fr) = node_split(r[j] * scale);
                let (yi, fg) = node_split(g[j] * scale);
                let (zi, fb) = node_split(b[j] * scale);
                at[j] = (xi * G + yi) * G + zi;
                // The path from the cube's low corner to its high corner steps along
                // the axes from the largest fraction to the smallest; its corners are
                // the tetrahedron's. Chosen with arithmetic, not branches: which
                // fraction is largest changes randomly from pixel to pixel.
                let h = max(max(fr, fg), fb);
                let l = min(min(fr, fg), fb);
                hi[j] = h;
                lo[j] = l;
                mid[j] = fr + fg + fb - h - l;
                let r_first = (fr >= fg) & (fr >= fb);
                let g_first = !r_first & (fg >= fb);
                let b_first = !r_first & !g_first;
                first[j] = R * r_first as u32 + G * g_first as u32 + B * b_first as u32;
                let b_last = (fb <= fr) & (fb <= fg);
                let g_last = !b_last & (fg <= fr);
                let r_last = !b_last & !g_last;
                second[j] = R + G + B - (B * b_last as u32 + G * g_last as u32 + R * r_last as u32);
            }
            for j in 0..n {
                let cube = &self.nodes[at[j] as usize..][..=(R + G + B) as usize];
                let c0 = cube[0];
                let c1 = cube[first[j] as usize];
                let c2 = cube[second[j] as usize];
                let c3 = cube[(R + G + B) as usize];
                let out: [f32; 3] = std::array::from_fn(|k| {
                    c0[k]
                        + (c1[k] - c0[k]) * hi[j]
                        + (c2[k] - c1[k]) * mid[j]
                        + (c3[k] - c2[k]) * lo[j]
                });
                (r[j], g[j], b[j]) = (out[0], out[1], out[2]);
            }
        }
    }

    /// The transfer at one colour without the LUT (for checking the LUT's accuracy).
    #[cfg(test)]
    fn exact(source: &Stats, target: &Stats, rgb: [f32; 3]) -> [f32; 3] {
        let (ms, ss, mt, st) = (source.mean(), source.std(), target.mean(), target.std());
        let lab = oklab_from_255(rgb);
        oklab_to_255(std::array::from_fn(|c| {
            let gain = if ss[c] <= 1e-6 {
                1.0
            } else {
                (st[c] / ss[c]).clamp(SPREAD_RATIO.0, SPREAD_RATIO.1)
            };
            (lab[c] - ms[c]) * gain + mt[c]
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oklab_round_trips_and_has_known_values() {
        // White is L = 1, a = b = 0 by construction of Oklab.
        let w = oklab_from_255([255.0; 3]);
        assert!(
            (w[0] - 1.0).abs() < 1e-3 && w[1].abs() < 1e-3 && w[2].abs() < 1e-3,
            "{w:?}"
        );
        // Pure red has a strongly positive a axis.
        let red = oklab_from_255([255.0, 0.0, 0.0]);
        assert!(red[1] > 0.2, "{red:?}");
        for rgb in [
            [0.0, 0.0, 0.0],
            [12.0, 200.0, 77.0],
            [255.0, 128.0, 3.0],
            [90.5, 90.5, 90.5],
        ] {
            let back = oklab_to_255(oklab_from_255(rgb));
            for c in 0..3 {
                assert!((back[c] - rgb[c]).abs() < 0.05, "{rgb:?} -> {back:?}");
            }
        }
    }

    #[test]
    fn interpolated_tables_match_the_curves() {
        for v in [0.0f32, 0.3, 10.5, 100.25, 254.9, 255.0] {
            let exact = srgb_to_linear(v / 255.0);
            assert!((linear_from_255(v) - exact).abs() < 2e-4, "{v}");
        }
        for i in 0..=10_000 {
            let l = i as f32 / 10_000.0;
            let exact = linear_to_srgb(l) * 255.0;
            assert!((srgb255_from_linear(l) - exact).abs() < 0.01, "{l}");
        }
        assert_eq!(srgb255_from_linear(-1.0), 0.0);
        assert!((srgb255_from_linear(2.0) - 255.0).abs() < 1e-3);
    }

    #[test]
    fn stats_mean_and_std() {
        let mut s = Stats::default();
        assert!(s.is_empty());
        s.add([1.0, 0.0, 5.0]);
        s.add([3.0, 0.0, 5.0]);
        assert_eq!(s.mean(), [2.0, 0.0, 5.0]);
        assert_eq!(s.std(), [1.0, 0.0, 0.0]);
    }

    #[test]
    fn sample_step_keeps_the_budget() {
        assert_eq!(sample_step(10, 10, 1000), 1);
        let step = sample_step(1024, 1024, 16_384) as u64;
        assert!((1024 * 1024) / (step * step) <= 16_384);
        assert!((1024 * 1024) / ((step - 1) * (step - 1)) > 16_384);
    }

    /// A one-row frame of the given pixels.
    fn row(pixels: &[[f32; 3]]) -> Frame {
        let planes = std::array::from_fn(|c| pixels.iter().map(|p| p[c]).collect());
        Frame::from_planes(pixels.len(), 1, planes)
    }

    #[test]
    fn transfer_between_equal_stats_is_near_identity() {
        let mut s = Stats::default();
        for v in [
            [10.0, 40.0, 200.0],
            [250.0, 3.0, 90.0],
            [128.0, 128.0, 128.0],
        ] {
            s.add(oklab_from_255(v));
        }
        let lut = TransferLut::new(&s, &s);
        let pixels = [
            [10.0, 40.0, 200.0],
            [77.0, 177.0, 17.0],
            [255.0; 3],
            [0.0; 3],
            [300.0, -5.0, 128.0],
        ];
        let mut frame = row(&pixels);
        lut.apply(&mut frame);
        for (x, want) in pixels.iter().enumerate() {
            let got = frame.pixel(x, 0);
            for c in 0..3 {
                let want = want[c].clamp(0.0, 255.0);
                assert!((got[c] - want).abs() < 1.0, "{got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn lut_is_close_to_the_exact_transfer() {
        let mut src = Stats::default();
        let mut dst = Stats::default();
        for i in 0..200 {
            let t = i as f32;
            src.add(oklab_from_255([t, (t * 7.0) % 255.0, 255.0 - t]));
            dst.add(oklab_from_255([
                200.0 + t / 5.0,
                100.0 + (t * 3.0) % 100.0,
                30.0 + t / 10.0,
            ]));
        }
        let lut = TransferLut::new(&src, &dst);
        // A deterministic spread of colours, off the LUT's nodes.
        let pixels: Vec<[f32; 3]> = (0..4096u32)
            .map(|i| {
                [
                    (i * 37 % 256) as f32 + 0.3,
                    (i * 101 % 256) as f32,
                    (i * 13 % 256) as f32 + 0.7,
                ]
            })
            .collect();
        let mut frame = row(&pixels);
        lut.apply(&mut frame);
        let mut errors = Vec::new();
        for (x, &rgb) in pixels.iter().enumerate() {
            let (got, want) = (frame.pixel(x, 0), TransferLut::exact(&src, &dst, rgb));
            errors.extend((0..3).map(|c| (got[c] - want[c]).abs()));
        }
        errors.sort_by(f32::total_cmp);
        let mean = errors.iter().sum::<f32>() / errors.len() as f32;
        let p99 = errors[errors.len() * 99 / 100];
        assert!(mean < 0.25, "mean error {mean}");
        assert!(p99 < 1.0, "99th percentile error {p99}");
        // The largest errors sit where the exact map clips to the gamut: a kink that no
        // interpolation between nodes 8 code values apart reproduces exactly.
        assert!(
            errors[errors.len() - 1] < 8.0,
            "worst error {}",
            errors[errors.len() - 1]
        );
    }

    #[test]
    fn transfer_moves_the_mean_to_the_target() {
        // Source: greys; target: oranges. After the transfer the frame's mean in Oklab
        // is the target's (up to gamut clipping and interpolation).
        let greys: Vec<[f32; 3]> = (0..64).map(|i| [60.0 + i as f32 * 2.0; 3]).collect();
        let mut frame = row(&greys);
        let mut src = Stats::default();
        sample_frame(&mut src, &frame, 1);
        let mut dst = Stats::default();
        for i in 0..64 {
            let v = i as f32;
            dst.add(oklab_from_255([200.0 + v / 2.0, 120.0 + v, 40.0]));
        }
        let lut = TransferLut::new(&src, &dst);
        lut.apply(&mut frame);
        let mut after = Stats::default();
        sample_frame(&mut after, &frame, 1);
        let (m, t) = (after.mean(), dst.mean());
        for c in 0..3 {
            assert!((m[c] - t[c]).abs() < 0.01, "axis {c}: {m:?} vs {t:?}");
        }
    }

    #[test]
    fn sampling_interleaved_bytes() {
        let mut s = Stats::default();
        // 3×2 image, every second pixel in both directions: (0,0) and (2,0).
        let data = [0u8, 0, 0, 9, 9, 9, 10, 20, 30, 9, 9, 9, 9, 9, 9, 9, 9, 9];
        sample_into(&mut s, &data, 3, 2, 2, |p| p);
        assert_eq!(s.mean(), [5.0, 10.0, 15.0]);
    }
}
