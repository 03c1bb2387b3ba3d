//! Scaled dot-product attention on the packed micro-kernel ("flash attention"): the
//! score matrix is never materialised, and both of its products run on
//! [`super::kernel`].
//!
//! The keys and values of every (batch entry, head) are packed once per call into the
//! micro-kernel's column panels: keys as `NR` keys × the head's channels, values as
//! [`KC`] keys × `NR` channels. Each task then takes `BQ` queries of one (batch entry,
//! head), packs them (scaled by `1/√d`) into row micro-panels, and walks the keys block
//! by block:
//!
//! 1. the scores `Q·Kᵀ` of the block (`BQ × KC`, in L2) by the micro-kernel;
//! 2. per query, the running maximum and sum of `exp(score - max)`; the block's scores
//!    are replaced by their exponentials and the accumulated output is rescaled by
//!    `exp(old max - new max)`;
//! 3. the exponentials are packed into row micro-panels and `O += P·V` by the
//!    micro-kernel;
//!
//! and finally divides each output row by its sum. The same algorithm as
//! [`crate::attention`], whose tile products run on the `gemm` crate; on one core of an
//! AMD EPYC with FLUX.2's heads (24 × 128 channels, 1280–4608 tokens) this runs at
//! 85–105 GFLOP/s, the tiled kernel at about 38 and PyTorch's CPU attention at about 76.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{kernel, Avx512, Out, KC, MR, NR};
use crate::rows::Rows;
use crate::simd::{exp, Kernel, Simd};

/// Queries per task (a multiple of `MR`).
const BQ: usize = MR * 8;

/// `softmax(q·kᵀ / √d)·v` over `heads` heads of `d = c / heads` channels, for `q`
/// `(b, n, c)` and `k`, `v` `(b, m, c)` f32 on the CPU whose rows are unit-stride (any
/// batch and token strides): `Some((b, n, c))` when this CPU has AVX-512, `None`
/// otherwise (the caller then runs [`crate::blocks::attention`]).
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Option<Tensor>> {
    let Some(isa) = Avx512::detect() else {
        return Ok(None);
    };
    if [q, k, v]
        .iter()
        .any(|t| !t.device().is_cpu() || t.dtype() != DType::F32 || t.rank() != 3)
    {
        return Ok(None);
    }
    let unit = |t: &Tensor| -> Result<Tensor> {
        if t.dim(2)? <= 1 || t.layout().stride()[2] == 1 {
            Ok(t.clone())
        } else {
            t.contiguous()
        }
    };
    let op = Attention {
        heads,
        isa,
        simd: Simd::detect(),
    };
    Ok(Some(unit(q)?.apply_op3_no_bwd(
        &unit(k)?,
        &unit(v)?,
        &op,
    )?))
}

struct Attention {
    heads: usize,
    isa: Avx512,
    simd: Simd,
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    m: usize,
    heads: usize,
    d: usize,
    /// Blocks of `KC` channels in a head.
    d_blocks: usize,
    /// Panels of `NR` channels in a head.
    d_panels: usize,
    /// Panels of `NR` keys.
    key_panels: usize,
    /// Blocks of `KC` keys.
    key_blocks: usize,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "sgemm-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = Rows::new("attention: q", s1, l1)?;
        let k = Rows::new("attention: k", s2, l2)?;
        let v = Rows::new("attention: v", s3, l3)?;
        let ([b, n, c], m) = crate::attention::fitting(q.dims, k.dims, v.dims)?;
        let heads = self.heads;
        if heads == 0 || c % heads != 0 {
            candle_core::bail!("attention: width {c} is not a multiple of {heads} heads");
        }
        let d = c / heads;
        let mut out = vec![0f32; b * n * c];
        // No keys: the product over an empty sum is zero, as in the other paths.
        if out.is_empty() || m == 0 {
            return Ok((CpuStorage::F32(out), Shape::from((b, n, c))));
        }
        let dims = Dims {
            b,
            n,
            m,
            heads,
            d,
            d_blocks: d.div_ceil(KC),
            d_panels: d.div_ceil(NR),
            key_panels: m.div_ceil(NR),
            key_blocks: m.div_ceil(KC),
        };
        let keys = pack_keys(&k, dims);
        let values = pack_values(&v, dims);
        let shared = Out {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        };
        let query_blocks = n.div_ceil(BQ);
        let (isa, simd) = (self.isa, self.simd);
        (0..b * heads * query_blocks).into_par_iter().for_each_init(
            || Scratch::new(dims),
            |scratch, t| {
                let (bh, qb) = (t / query_blocks, t % query_blocks);
                let task = Task {
                    dims,
                    batch: bh / heads,
                    head: bh % heads,
                    first: qb * BQ,
                    rows: BQ.min(n - qb * BQ),
                    isa,
                    simd,
                };
                task.run(&q, &keys, &values, scratch, shared);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }
}

/// The keys of every (batch entry, head) as column panels: for head slot `bh`, channel
/// block `p` and key panel `kp`, at `((bh·d_blocks + p)·key_panels + kp)·KC·NR + i·NR + j`,
/// channel `p·KC + i` of key `kp·NR + j` (zero past the last key).
fn pack_keys(k: &Rows, dims: Dims) -> Vec<f32> {
    let Dims {
        heads,
        d,
        d_blocks,
        key_panels,
        m,
        ..
    } = dims;
    let mut data = vec![0f32; dims.b * heads * d_blocks * key_panels * KC * NR];
    data.par_chunks_mut(KC * NR)
        .enumerate()
        .for_each(|(t, dst)| {
            let (slot, kp) = (t / key_panels, t % key_panels);
            let (bh, p) = (slot / d_blocks, slot % d_blocks);
            let (batch, head) = (bh / heads, bh % heads);
            let (c0, kc) = (p * KC, KC.min(d - p * KC));
            for j in 0..NR.min(m - kp * NR) {
                let src = k.part(batch, kp * NR + j, head * d + c0, kc);
                for (i, &x) in src.iter().enumerate() {
                    dst[i * NR + j] = x;
                }
            }
        });
    data
}

/// The values of every (batch entry, head) as column panels: for head slot `bh`, key
/// block `p` and channel panel `cp`, at `((bh·key_blocks + p)·d_panels + cp)·KC·NR +
/// i·NR + j`, channel `cp·NR + j` of key `p·KC + i` (zero past the last key or channel).
fn pack_values(v: &Rows, dims: Dims) -> Vec<f32> {
    let Dims {
        heads,
        d,
        d_panels,
        key_blocks,
        m,
        ..
    } = dims;
    let mut data = vec![0f32; dims.b * heads * key_blocks * d_panels * KC * NR];
    data.par_chunks_mut(KC * NR)
        .enumerate()
        .for_each(|(t, dst)| {
            let (slot, cp) = (t / d_panels, t % d_panels);
            let (bh, p) = (slot / key_blocks, slot % key_blocks);
            let (batch, head) = (bh / heads, bh % heads);
            let width = NR.min(d - cp * NR);
            for i in 0..KC.min(m - p * KC) {
                let src = v.part(batch, p * KC + i, head * d + cp * NR, width);
                dst[i * NR..i * NR + width].copy_from_slice(src);
            }
        });
    data
}

/// A task's buffers, reused across the tasks of a thread.
struct Scratch {
    /// The queries as row micro-panels: channel block `p`, micro-panel `r` at
    /// `(p·BQ/MR + r)·KC·MR`.
    queries: Vec<f32>,
    /// The scores, then their exponentials, of one key block: `BQ × KC`, row-major.
    scores: Vec<f32>,
    /// The exponentials as row micro-panels (`MR` queries × `KC` keys each).
    weights: Vec<f32>,
    /// The unnormalised output, `BQ × d_panels·NR`, row-major.
    acc: Vec<f32>,
    /// Running maximum and sum per query.
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Scratch {
    fn new(dims: Dims) -> Self {
        Self {
            queries: vec![0f32; dims.d_blocks * BQ * KC],
            scores: vec![0f32; BQ * KC],
            weights: vec![0f32; BQ * KC],
            acc: vec![0f32; BQ * dims.d_panels * NR],
            max: vec![0f32; BQ],
            sum: vec![0f32; BQ],
        }
    }
}

/// One task: queries `first..first + rows` of one (batch entry, head).
struct Task {
    dims: Dims,
    batch: usize,
    head: usize,
    first: usize,
    rows: usize,
    isa: Avx512,
    simd: Simd,
}

impl Task {
    fn run(&self, q: &Rows, keys: &[f32], values: &[f32], s: &mut Scratch, out: Out) {
        let Dims {
            heads,
            d,
            d_blocks,
            d_panels,
            key_panels,
            key_blocks,
            m,
            ..
        } = self.dims;
        let rows = self.rows;
        let micro = rows.div_ceil(MR);
        let bh = self.batch * heads + self.head;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        // Pack the queries, scaled.
        for p in 0..d_blocks {
            let (c0, kc) = (p * KC, KC.min(d - p * KC));
            for i in 0..rows {
                let src = q.part(self.batch, self.first + i, self.head * d + c0, kc);
                let panel = &mut s.queries[(p * (BQ / MR) + i / MR) * KC * MR..];
                for (kk, &x) in src.iter().enumerate() {
                    panel[kk * MR + i % MR] = x * scale;
                }
            }
        }
        let acc_width = d_panels * NR;
        s.acc.fill(0.0);
        s.max[..rows].fill(f32::NEG_INFINITY);
        s.sum[..rows].fill(0.0);
        for kb in 0..key_blocks {
            let (k0, bk) = (kb * KC, KC.min(m - kb * KC));
            // 1. Scores of this key block.
            for p in 0..d_blocks {
                let kc = KC.min(d - p * KC);
                for kp in k0 / NR..(k0 + bk).div_ceil(NR).min(key_panels) {
                    let panel =
                        &keys[((bh * d_blocks + p) * key_panels + kp) * KC * NR..][..kc * NR];
                    let cols = NR.min(m - kp * NR);
                    for r in 0..micro {
                        let a = &s.queries[(p * (BQ / MR) + r) * KC * MR..][..kc * MR];
                        let first = r * MR * KC + (kp * NR - k0);
                        // SAFETY: the CPU has AVX-512F (`isa`); `a` and `panel` hold
                        // `kc·MR` and `kc·NR` values; the tile (`MR.min(rows - r·MR)`
                        // rows × `cols` columns, rows `KC` apart from `first`) lies in
                        // this task's own `scores` (`BQ × KC`: column
                        // `kp·NR - k0 + cols ≤ bk ≤ KC`), which nothing else accesses.
                        unsafe {
                            kernel(
                                self.isa,
                                kc,
                                a,
                                panel,
                                s.scores.as_mut_ptr().wrapping_add(first),
                                KC,
                                MR.min(rows - r * MR),
                                cols,
                                p > 0,
                            );
                        }
                    }
                }
            }
            // 2. Online softmax, row by row; 3a. pack the exponentials.
            for i in 0..rows {
                let row = &mut s.scores[i * KC..i * KC + bk];
                let corr = self.simd.run(SoftmaxRow {
                    row,
                    max: &mut s.max[i],
                    sum: &mut s.sum[i],
                });
                if corr != 1.0 {
                    for x in &mut s.acc[i * acc_width..(i + 1) * acc_width] {
                        *x *= corr;
                    }
                }
                let panel = &mut s.weights[(i / MR) * KC * MR..];
                for (kk, &x) in row.iter().enumerate() {
                    panel[kk * MR + i % MR] = x;
                }
            }
            // 3b. O += P·V.
            for cp in 0..d_panels {
                let panel =
                    &values[((bh * key_blocks + kb) * d_panels + cp) * KC * NR..][..bk * NR];
                let cols = NR.min(d - cp * NR);
                for r in 0..micro {
                    let a = &s.weights[r * KC * MR..][..bk * MR];
                    let first = r * MR * acc_width + cp * NR;
                    // SAFETY: as for the scores: `a` and `panel` hold `bk·MR` and
                    // `bk·NR` values, and the tile lies in this task's own `acc`
                    // (`BQ × acc_width`, column `cp·NR + cols ≤ d ≤ acc_width`).
                    unsafe {
                        kernel(
                            self.isa,
                            bk,
                            a,
                            panel,
                            s.acc.as_mut_ptr().wrapping_add(first),
                            acc_width,
                            MR.min(rows - r * MR),
                            cols,
                            true,
                        );
                    }
                }
            }
        }
        // Normalise into this task's rows and head columns of the output.
        let c = heads * d;
        for i in 0..rows {
            let inv = 1.0 / s.sum[i];
            let first = (self.batch * self.dims.n + self.first + i) * c + self.head * d;
            let src = &s.acc[i * acc_width..i * acc_width + d];
            for (j, &x) in src.iter().enumerate() {
                // SAFETY: element `first + j` (row `batch·n + first + i`, column
                // `head·d + j < c`) lies in the `b × n × c` output; the pointer comes
                // from the whole buffer, and only this task writes this (row, head)
                // block: tasks own disjoint (batch entry, head, query block) triples.
                unsafe { out.at(first + j).write(x * inv) };
            }
        }
    }
}

/// One query's online-softmax step over a block of scores: raises the running maximum,
/// rescales the running sum, replaces the scores by `exp(score - max)` and adds them to
/// the sum; returns the factor `exp(old max - new max)` for the accumulated output.
struct SoftmaxRow<'a> {
    row: &'a mut [f32],
    max: &'a mut f32,
    sum: &'a mut f32,
}

impl Kernel for SoftmaxRow<'_> {
    type Output = f32;

    #[inline(always)]
    fn run<const FMA: bool>(self) -> f32 {
        const LANES: usize = 16;
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let chunks = self.row.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l = if x > *l { x } else { *l };
            }
        }
        let block = tail
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
        let new = self.max.max(block);
        // On the first block the old maximum is -inf: the factor is 0, and the sum and
        // the accumulated output are zero anyway.
        let corr = exp::<FMA>(*self.max - new);
        *self.max = new;
        let mut sums = [0f32; LANES];
        let mut chunks = self.row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (s, x) in sums.iter_mut().zip(c) {
                *x = exp::<FMA>(*x - new);
                *s += *x;
            }
        }
        let mut total: f32 = 0.0;
        for x in chunks.into_remainder() {
            *x = exp::<FMA>(*x - new);
            total += *x;
        }
        *self.sum = *self.sum * corr + sums.iter().sum::<f32>() + total;
        corr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs;
    use candle_core::Device;

    fn randn(shape: (usize, usize, usize)) -> Tensor {
        Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap()
    }

    /// The packed attention against the materialising path.
    fn check(b: usize, heads: usize, n: usize, m: usize, d: usize) {
        let c = heads * d;
        let q = (randn((b, n, c)) * 2.0).unwrap();
        let k = randn((b, m, c));
        let v = randn((b, m, c));
        let want = crate::blocks::attention_chunked(&q, &k, &v, heads, usize::MAX).unwrap();
        let Some(got) = attention(&q, &k, &v, heads).unwrap() else {
            assert!(Avx512::detect().is_none());
            return;
        };
        assert_eq!(got.dims(), want.dims());
        let diff = max_abs(&(&got - &want).unwrap());
        assert!(
            diff <= 1e-5 * max_abs(&v),
            "{:?}: max |diff| {diff}",
            (b, heads, n, m, d)
        );
    }

    #[test]
    fn matches_materialized_attention() {
        // (b, heads, n, m, d): FLUX.2's head width, query and key counts that are not
        // multiples of the blocks, several key blocks, head widths below, between and
        // above the panels and the channel block, a single key.
        for shape in [
            (1, 2, 300, 300, 128),
            (2, 3, 97, 530, 64),
            (1, 1, 5, 3, 7),
            (1, 2, 130, 77, 40),
            (1, 1, 50, 600, 300),
            (2, 2, 13, 1, 16),
        ] {
            let (b, heads, n, m, d) = shape;
            check(b, heads, n, m, d);
        }
    }

    #[test]
    fn strided_operands_and_empty_shapes() {
        // Queries, keys and values as views into one joint projection.
        let (heads, d, n) = (2, 32, 70);
        let qkv = randn((1, n, 3 * heads * d));
        let part = |i: usize| qkv.narrow(2, i * heads * d, heads * d).unwrap();
        let (q, k, v) = (part(0), part(1), part(2));
        let want = crate::blocks::attention_chunked(&q, &k, &v, heads, usize::MAX).unwrap();
        if let Some(got) = attention(&q, &k, &v, heads).unwrap() {
            let diff = max_abs(&(&got - &want).unwrap());
            assert!(diff <= 1e-5 * max_abs(&v), "{diff}");
        }
        // No keys: zeros; no queries: empty.
        let q = randn((1, 4, 8));
        let none = randn((1, 0, 8));
        if let Some(got) = attention(&q, &none, &none, 2).unwrap() {
            assert_eq!(got.dims(), &[1, 4, 8]);
            assert_eq!(max_abs(&got), 0.0);
        }
        if let Some(got) = attention(&none, &q, &q, 2).unwrap() {
            assert_eq!(got.dims(), &[1, 0, 8]);
        }
        // A width that is not a multiple of the heads is refused.
        if Avx512::detect().is_some() {
            assert!(attention(&q, &q, &q, 3).is_err());
        }
    }
}
