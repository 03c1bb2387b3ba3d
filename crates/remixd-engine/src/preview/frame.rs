//! The working image of the pipeline: a band of rows as three planes (R, G, B) of `f32`
//! on the 0..=255 scale.
//!
//! Planes rather than interleaved pixels because every stage after compositing is a
//! per-channel loop over contiguous memory (blurs, curves, quantisation, the LUT's
//! index arithmetic), which the compiler vectorises; with interleaved RGB the stride of
//! three defeats it. Floats rather than bytes so that washing, blending and grading do
//! not round at every step; bytes come back only at the end.
//!
//! A frame usually holds a band of a few dozen rows of the image, not all of it: the
//! pipeline renders band by band so its working set stays in the CPU's cache and a
//! render does not touch (and have the kernel zero) tens of megabytes of fresh memory.

use std::ops::Range;

/// A band of an image being rendered: `planes[c][y * w + x]` is row `y0 + y` of the
/// image.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Frame {
    pub(crate) w: usize,
    pub(crate) h: usize,
    /// The image row of the band's first row.
    pub(crate) y0: usize,
    pub(crate) planes: [Vec<f32>; 3],
}

/// 1.5·2²³: adding it to a float in 0..2²² leaves the value rounded to an integer in the
/// low mantissa bits (ties to even). Unlike a float-to-int cast, which Rust defines to
/// saturate, this is plain arithmetic that the compiler vectorises.
pub(crate) const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `v` limited to 0..=255. Plain comparisons instead of `f32::clamp`, whose NaN rule
/// costs extra vector instructions; no NaN reaches the pipeline's loops.
#[inline(always)]
pub(crate) fn clamp_255(v: f32) -> f32 {
    let v = if v > 0.0 { v } else { 0.0 };
    if v < 255.0 {
        v
    } else {
        255.0
    }
}

/// `v` clamped to 0..=255 and rounded to the nearest integer (ties to even).
#[inline(always)]
pub(crate) fn to_u8(v: f32) -> u8 {
    (clamp_255(v) + ROUNDING_MAGIC).to_bits() as u8
}

impl Frame {
    /// An empty band for images `w` pixels wide.
    pub(crate) fn new(w: usize) -> Self {
        Self {
            w,
            h: 0,
            y0: 0,
            planes: [Vec::new(), Vec::new(), Vec::new()],
        }
    }

    /// A band from whole planes (tests build frames this way).
    #[cfg(test)]
    pub(crate) fn from_planes(w: usize, h: usize, planes: [Vec<f32>; 3]) -> Self {
        Self {
            w,
            h,
            y0: 0,
            planes,
        }
    }

    /// Makes the band hold image rows `rows` of `base` (interleaved RGB8, `w` wide),
    /// washed: `base·s + wash·(1−s)`. The planes' memory is reused from band to band.
    ///
    /// At `s = 1` every value is `b·1 + 0`, exactly `b`: the pipeline's promise that a
    /// full-strength AUTO render leaves the background untouched rests on it.
    pub(crate) fn fill_washed(&mut self, base: &[u8], rows: Range<usize>, s: f32, wash: [f32; 3]) {
        let w = self.w;
        self.y0 = rows.start;
        self.h = rows.len();
        let n = self.h * w;
        let add = wash.map(|c| c * (1.0 - s));
        for plane in &mut self.planes {
            plane.resize(n, 0.0);
        }
        let src = &base[rows.start * w * 3..rows.end * w * 3];
        let [r, g, b] = &mut self.planes;
        for (((px, r), g), b) in src
            .chunks_exact(3)
            .zip(r.iter_mut())
            .zip(g.iter_mut())
            .zip(b.iter_mut())
        {
            *r = px[0] as f32 * s + add[0];
            *g = px[1] as f32 * s + add[1];
            *b = px[2] as f32 * s + add[2];
        }
    }

    /// Writes the band's rows `rows` (relative to the band) as interleaved RGB8 into
    /// `out`, each value clamped and rounded to nearest.
    pub(crate) fn write_rgb8(&self, rows: Range<usize>, out: &mut [u8]) {
        let w = self.w;
        // Quantise each plane's row in a loop that vectorises, then interleave.
        let mut q = [vec![0u8; w], vec![0u8; w], vec![0u8; w]];
        for (y, dst) in rows.zip(out.chunks_exact_mut(w * 3)) {
            for (q, plane) in q.iter_mut().zip(&self.planes) {
                for (q, &v) in q.iter_mut().zip(&plane[y * w..][..w]) {
                    *q = to_u8(v);
                }
            }
            let [r, g, b] = &q;
            // Three single-byte stores: building a 3-byte array and copying it went
            // through the stack and stalled on every pixel.
            for (((px, &r), &g), &b) in dst.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
                px[0] = r;
                px[1] = g;
                px[2] = b;
            }
        }
    }

    /// The three values of one pixel, `y` relative to the band.
    pub(crate) fn pixel(&self, x: usize, y: usize) -> [f32; 3] {
        let i = y * self.w + x;
        self.planes.each_ref().map(|p| p[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn washing_mixes_base_and_wash_and_round_trips_at_full_strength() {
        let base = [10u8, 20, 30, 250, 0, 128, 1, 2, 3, 4, 5, 6];
        let mut f = Frame::new(2);
        f.fill_washed(&base, 0..2, 1.0, [99.0, 99.0, 99.0]);
        let mut out = [0u8; 12];
        f.write_rgb8(0..2, &mut out);
        assert_eq!(out, base);
        assert_eq!(f.pixel(1, 0), [250.0, 0.0, 128.0]);
        // The second row alone, half washed; the band remembers where it is.
        f.fill_washed(&base, 1..2, 0.5, [100.0, 200.0, 0.0]);
        assert_eq!((f.y0, f.h, f.planes[0].len()), (1, 1, 2));
        assert_eq!(f.pixel(0, 0), [50.5, 101.0, 1.5]);
    }

    #[test]
    fn conversion_clamps_and_rounds() {
        let f = Frame::from_planes(
            3,
            1,
            [
                vec![-3.0, 254.6, 0.49],
                vec![300.0, 0.51, 63.75],
                vec![127.5, 12.2, 191.25],
            ],
        );
        let mut out = [0u8; 9];
        f.write_rgb8(0..1, &mut out);
        assert_eq!(out, [0, 255, 128, 255, 1, 12, 0, 64, 191]);
        for v in 0..=255u8 {
            assert_eq!(to_u8(v as f32), v);
            assert_eq!(to_u8(v as f32 + 0.3), v);
            assert_eq!(to_u8(v as f32 - 0.3), v);
        }
    }
}
