//! Winograd's minimal filtering F(2×2, 3×3) for 3×3 convolutions of stride 1 and padding 1
//! on the CPU: 16 multiplications per 2×2 output tile and input channel where the direct
//! form needs 36, so 2.25× fewer FLOPs in the matrix products that dominate the UNet's
//! and the VAE's convolutions.
//!
//! With `d` a 4×4 input patch (tiles overlap by 2), `g` a 3×3 kernel and
//! `Bᵀ`, `G`, `Aᵀ` the F(2, 3) matrices (Lavin and Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2015), one output tile is `Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A`.
//! Summed over input channels, the element-wise product becomes 16 independent matrix
//! products, one per position ξ of the 4×4 transformed tile:
//! `M[ξ] (c_out × tiles) = U[ξ] (c_out × c_in) · V[ξ] (c_in × tiles)`. This module
//! transforms the kernel (`U`) and, strip by strip of tile rows, the input (`V`), runs the
//! 16 products on the `gemm` crate and adds the output transform of `M` into the output,
//! which holds the bias and addend already. The transforms use only additions and
//! halvings, so F(2×2, 3×3) in f32 stays close to the direct sum (the tests hold it to
//! 1e-5 of the output's scale; larger tiles would lose more). candle has no Winograd
//! convolution, hence the hand-written one.

use gemm::Parallelism;
use rayon::prelude::*;

/// Transformed-tile positions: F(2×2, 3×3) works on 4×4 tiles.
const XI: usize = 16;

/// The transformed kernel `U = G g Gᵀ`, laid out `[c_out][ξ][c_in]`, from the weight
/// `(c_out, c_in, 3, 3)`.
fn transform_kernel(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut u = vec![0f32; c_out * XI * c_in];
    u.par_chunks_exact_mut(XI * c_in)
        .zip(weight.par_chunks_exact(9 * c_in))
        .for_each(|(u, w)| {
            for (ci, g) in w.chunks_exact(9).enumerate() {
                // G g: rows g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2 of the kernel's rows.
                let mut gg = [[0f32; 3]; 4];
                for x in 0..3 {
                    let (a, b, c) = (g[x], g[3 + x], g[6 + x]);
                    gg[0][x] = a;
                    gg[1][x] = 0.5 * (a + b + c);
                    gg[2][x] = 0.5 * (a - b + c);
                    gg[3][x] = c;
                }
                // (G g) Gᵀ: the same combination along each row.
                for (i, r) in gg.iter().enumerate() {
                    let row = [
                        r[0],
                        0.5 * (r[0] + r[1] + r[2]),
                        0.5 * (r[0] - r[1] + r[2]),
                        r[2],
                    ];
                    for (j, v) in row.into_iter().enumerate() {
                        u[(4 * i + j) * c_in + ci] = v;
                    }
                }
            }
        });
    u
}

/// The source images of one convolution: each `c` channels of `h × w`, read as if
/// upsampled 2× (nearest) when `up` is 1, padded by one zero pixel on each side.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub img: &'a [f32],
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub up: usize,
}

impl Source<'_> {
    /// Fills `row` with padded row `y` of channel plane `src` (logical row `y - 1` of the
    /// upsampled image; zeros outside it), from padded column 0 on.
    fn padded_row(&self, src: &[f32], y: usize, row: &mut [f32]) {
        let (h, w) = (self.h << self.up, self.w << self.up);
        let y = y.wrapping_sub(1);
        row.fill(0.0);
        if y >= h {
            return;
        }
        let line = &src[(y >> self.up) * self.w..][..self.w];
        let end = (w + 1).min(row.len());
        let inside = &mut row[1..end];
        if self.up == 0 {
            inside.copy_from_slice(&line[..inside.len()]);
        } else {
            for (x, v) in inside.iter_mut().enumerate() {
                *v = line[x >> self.up];
            }
        }
    }
}

/// Adds the 3×3, stride 1, padding 1 convolution of every image of `src` (`src.img` holds
/// them one after another) by `weight` (`(c_out, c_in, 3, 3)`) into `dst` (per image,
/// `c_out` planes of the logical input's size). The kernel is transformed once per call
/// and the two scratch buffers (transformed input and products, at most `max_floats`
/// values each) serve every image.
pub(crate) fn conv3x3(
    src: Source,
    weight: &[f32],
    c_out: usize,
    dst: &mut [f32],
    max_floats: usize,
    parallelism: Parallelism,
) {
    let c = src.c;
    // No input value (no channel, no pixel) or no output: nothing to add, and the loops
    // below split by image and by plane, which would be empty chunks.
    if src.img.is_empty() || dst.is_empty() {
        return;
    }
    let u = transform_kernel(weight, c_out, c);
    let (ho, wo) = (src.h << src.up, src.w << src.up);
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));
    let rows = (max_floats / (XI * c.max(c_out).max(1) * tw)).clamp(1, th);
    let mut v = vec![0f32; XI * c * rows * tw];
    let mut m = vec![0f32; XI * c_out * rows * tw];
    let plane = ho * wo;
    let images = src
        .img
        .chunks_exact(c * src.h * src.w)
        .zip(dst.chunks_exact_mut(c_out * plane));
    for (img, dst) in images {
        for top in (0..th).step_by(rows) {
            let tiles = rows.min(th - top) * tw;
            let stride = XI * tiles;
            // V = Bᵀ d B per channel and tile, laid out [c_in][ξ][tile].
            v[..c * stride]
                .par_chunks_exact_mut(stride)
                .enumerate()
                .for_each(|(ci, v)| {
                    let plane_src = &img[ci * src.h * src.w..][..src.h * src.w];
                    // Four padded input rows, then their column transform, [row][j][tile].
                    let mut rows_in = vec![0f32; 4 * (2 * tw + 2)];
                    let mut cols = vec![0f32; 16 * tw];
                    for ty in 0..tiles / tw {
                        let y0 = 2 * (top + ty);
                        for (r, row) in rows_in.chunks_exact_mut(2 * tw + 2).enumerate() {
                            src.padded_row(plane_src, y0 + r, row);
                        }
                        // d·B along each row: d0-d2, d1+d2, d2-d1, d1-d3 of each tile's 4 columns.
                        for (row, ct) in rows_in
                            .chunks_exact(2 * tw + 2)
                            .zip(cols.chunks_exact_mut(4 * tw))
                        {
                            let (c0, rest) = ct.split_at_mut(tw);
                            let (c1, rest) = rest.split_at_mut(tw);
                            let (c2, c3) = rest.split_at_mut(tw);
                            for (t, (((e0, e1), e2), e3)) in
                                c0.iter_mut().zip(c1).zip(c2).zip(c3).enumerate()
                            {
                                let d = &row[2 * t..2 * t + 4];
                                *e0 = d[0] - d[2];
                                *e1 = d[1] + d[2];
                                *e2 = d[2] - d[1];
                                *e3 = d[1] - d[3];
                            }
                        }
                        // Bᵀ(d·B) down the columns, into V[ξ = 4i + j][tile].
                        let (r0, r1, r2, r3) = (
                            &cols[..4 * tw],
                            &cols[4 * tw..8 * tw],
                            &cols[8 * tw..12 * tw],
                            &cols[12 * tw..],
                        );
                        for j in 0..4 {
                            let span = j * tw..(j + 1) * tw;
                            let (a, b, c, d) = (
                                &r0[span.clone()],
                                &r1[span.clone()],
                                &r2[span.clone()],
                                &r3[span],
                            );
                            let at = |i: usize| (4 * i + j) * tiles + ty * tw;
                            for (o, (x, z)) in v[at(0)..][..tw].iter_mut().zip(a.iter().zip(c)) {
                                *o = x - z;
                            }
                            for (o, (x, z)) in v[at(1)..][..tw].iter_mut().zip(b.iter().zip(c)) {
                                *o = x + z;
                            }
                            for (o, (x, z)) in v[at(2)..][..tw].iter_mut().zip(c.iter().zip(b)) {
                                *o = x - z;
                            }
                            for (o, (x, z)) in v[at(3)..][..tw].iter_mut().zip(b.iter().zip(d)) {
                                *o = x - z;
                            }
                        }
                    }
                });
            for xi in 0..XI {
                // M[ξ] (c_out × tiles, row stride 16·tiles) = U[ξ] (c_out × c_in, row stride
                // 16·c_in) · V[ξ] (c_in × tiles, row stride 16·tiles).
                // SAFETY: `m` holds `c_out` rows of `16·tiles` values and this product writes
                // columns `ξ·tiles..(ξ+1)·tiles` of each; `u` holds `c_out` rows of
                // `16·c_in`, of which columns `ξ·c_in..(ξ+1)·c_in` are read; `v` holds `c_in`
                // rows of `16·tiles`, of which columns `ξ·tiles..(ξ+1)·tiles` are read. The
                // buffers do not overlap. Each pointer comes from the slice that starts at
                // the first element the product touches and runs to the buffer's end, so it
                // may reach every element read or written (provenance), and the slicing is
                // bounds-checked.
                unsafe {
                    gemm::gemm(
                        c_out,
                        tiles,
                        c,
                        m[xi * tiles..].as_mut_ptr(),
                        1,
                        stride as isize,
                        false,
                        u[xi * c..].as_ptr(),
                        1,
                        (XI * c) as isize,
                        v[xi * tiles..].as_ptr(),
                        1,
                        stride as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
            // Y = Aᵀ M A per output channel and tile, added into the output.
            dst.par_chunks_exact_mut(plane)
                .zip(m[..c_out * stride].par_chunks_exact(stride))
                .for_each(|(out, m)| {
                    let mut am = vec![0f32; 8 * tw];
                    for ty in 0..tiles / tw {
                        let row = |xi: usize| &m[xi * tiles + ty * tw..][..tw];
                        // Aᵀ M down the columns: rows m0+m1+m2 and m1-m2-m3, [i][j][tile].
                        let (top_rows, bottom_rows) = am.split_at_mut(4 * tw);
                        for (j, (a0, a1)) in top_rows
                            .chunks_exact_mut(tw)
                            .zip(bottom_rows.chunks_exact_mut(tw))
                            .enumerate()
                        {
                            let (m0, m1, m2, m3) = (row(j), row(4 + j), row(8 + j), row(12 + j));
                            for t in 0..tw {
                                a0[t] = m0[t] + m1[t] + m2[t];
                                a1[t] = m1[t] - m2[t] - m3[t];
                            }
                        }
                        // (Aᵀ M)A along the rows: a0+a1+a2 and a1-a2-a3, into output rows y0, y0+1.
                        for (i, a) in am.chunks_exact(4 * tw).enumerate() {
                            let y = 2 * (top + ty) + i;
                            if y >= ho {
                                break;
                            }
                            let line = &mut out[y * wo..][..wo];
                            let (a0, a1, a2, a3) =
                                (&a[..tw], &a[tw..2 * tw], &a[2 * tw..3 * tw], &a[3 * tw..]);
                            for (t, pair) in line.chunks_mut(2).enumerate() {
                                pair[0] += a0[t] + a1[t] + a2[t];
                                if let Some(second) = pair.get_mut(1) {
                                    *second += a1[t] - a2[t] - a3[t];
                                }
                            }
                        }
                    }
                });
        }
    }
}
