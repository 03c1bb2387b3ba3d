//! Tiled scaled dot-product attention for the CPU, with an online softmax.
//!
//! The materialising path (`q·kᵀ`, softmax, `·v` with candle ops) writes and re-reads a
//! full `n × m` score matrix per head: 64 MiB at 4096 tokens, so attention on the CPU is
//! bound by memory traffic and by candle's scalar `exp`. Here each task takes one block
//! of query rows of one head and walks the keys block by block ("flash attention"):
//!
//! 1. `S = scale · Q_blk · K_blkᵀ`, a `BLOCK_Q × BLOCK_K` tile that stays in cache;
//! 2. per row, the running maximum and the running sum of `exp(S - max)` are updated, and
//!    the accumulated output row is rescaled by `exp(old max - new max)` when the maximum
//!    grows (`S` is overwritten by the exponentials);
//! 3. `O_blk += S · V_blk`;
//!
//! and finally divides each output row by its sum. Both products run on the `gemm` crate
//! (the one candle's own CPU matmul uses), single-threaded inside rayon tasks over
//! (batch, query block); the exponentials use a vectorisable polynomial `exp`.
//!
//! Hand-written because neither candle (0.11) nor any crate it builds on has a CPU
//! attention kernel that avoids the score matrix: candle-nn's `scaled_dot_product_attention`
//! is Metal-only, and candle-flash-attn is CUDA-only.
//!
//! A per-key additive bias (masking keys, e.g. a reference image's region) belongs right
//! after step 1: add `bias[j]` to column `j` of `S` before the row maxima are taken. A row
//! whose keys are all masked with `-inf` would then need its maximum kept finite (or its
//! output defined as zero) to avoid `exp(-inf - -inf)`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per task (and per score tile).
const BLOCK_Q: usize = 64;
/// Keys per score tile.
const BLOCK_K: usize = 256;

/// Scaled dot-product attention over `heads` heads with the tiled CPU kernel.
///
/// Same contract as the UNet's attention: `q` is `(b, n, heads·d)`, `k` and `v` are
/// `(b, m, heads·d)` (any strides, e.g. broadcast over the batch); the result is a new
/// contiguous `(b, n, heads·d)` tensor. Only f32 tensors on the CPU are supported.
pub fn tiled_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    q.apply_op3_no_bwd(
        k,
        v,
        &TiledAttention {
            heads,
            blocks: Blocks {
                q: BLOCK_Q,
                k: BLOCK_K,
            },
        },
    )
}

/// The materialising attention with candle ops (score matrix, softmax, product with the
/// values), which runs on devices other than the CPU. Public, like
/// [`tiled_attention`], so that the `attention_bench` example can compare the two.
pub fn materialized_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    crate::blocks::attention_chunked(q, k, v, heads, crate::blocks::MAX_SCORES)
}

/// Tile sizes: query rows per task, keys per score tile.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    q: usize,
    k: usize,
}

/// The kernel as a candle op over three CPU storages.
#[derive(Debug, Clone, Copy)]
struct TiledAttention {
    heads: usize,
    blocks: Blocks,
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-attention"
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
        let q = Operand::new("q", s1, l1)?;
        let k = Operand::new("k", s2, l2)?;
        let v = Operand::new("v", s3, l3)?;
        let [b, n, c] = q.dims;
        let m = k.dims[1];
        if k.dims != [b, m, c] || v.dims != k.dims {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                q.dims,
                k.dims,
                v.dims
            );
        }
        if self.heads == 0 || c % self.heads != 0 {
            candle_core::bail!(
                "attention: width {c} is not a multiple of {} heads",
                self.heads
            );
        }
        let out = attend(&q, &k, &v, self.heads, self.blocks);
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }
}

/// A `(batch, tokens, channels)` f32 operand as its storage and strides.
struct Operand<'a> {
    data: &'a [f32],
    start: usize,
    dims: [usize; 3],
    strides: [usize; 3],
}

impl<'a> Operand<'a> {
    fn new(name: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("attention: {name} is {:?}, not f32", storage.dtype());
        };
        let (Ok(&[b, n, c]), Ok(&[sb, sn, sc])) = (
            <&[usize; 3]>::try_from(layout.dims()),
            <&[usize; 3]>::try_from(layout.stride()),
        ) else {
            candle_core::bail!("attention: {name} has shape {:?}, not 3-D", layout.dims());
        };
        let op = Self {
            data: data.as_slice(),
            start: layout.start_offset(),
            dims: [b, n, c],
            strides: [sb, sn, sc],
        };
        // Every element the kernel reads lies at or before the last element's offset; the
        // raw-pointer products below rely on this check.
        if b * n * c > 0 && op.offset(b - 1, n - 1, c - 1) >= op.data.len() {
            candle_core::bail!("attention: {name}'s layout runs past its storage");
        }
        Ok(op)
    }

    fn offset(&self, batch: usize, token: usize, channel: usize) -> usize {
        let [sb, sn, sc] = self.strides;
        self.start + batch * sb + token * sn + channel * sc
    }

    /// Pointer to element `(batch, token, channel)`, which must be in range.
    fn ptr(&self, batch: usize, token: usize, channel: usize) -> *const f32 {
        &self.data[self.offset(batch, token, channel)]
    }

    fn token_stride(&self) -> isize {
        self.strides[1] as isize
    }

    fn channel_stride(&self) -> isize {
        self.strides[2] as isize
    }
}

/// Per-task buffers, reused across the heads and key blocks of a task.
struct Scratch {
    /// The score tile, `rows × blocks.k`, row-major; holds the exponentials after step 2.
    scores: Vec<f32>,
    /// The unnormalised output rows, `rows × d`.
    acc: Vec<f32>,
    /// Running maximum of each row's scores.
    max: Vec<f32>,
    /// Running sum of each row's `exp(score - max)`.
    sum: Vec<f32>,
}

/// `softmax(q·kᵀ / sqrt(d))·v` per head into a new contiguous `(b, n, heads·d)` buffer.
fn attend(q: &Operand, k: &Operand, v: &Operand, heads: usize, blocks: Blocks) -> Vec<f32> {
    let [b, n, c] = q.dims;
    let m = k.dims[1];
    let d = c / heads;
    let mut out = vec![0f32; b * n * c];
    // No keys: the materialising path's product over an empty sum is zero, as here.
    if out.is_empty() || m == 0 {
        return out;
    }
    let rows = task_rows(b, n, blocks.q, candle_core::utils::get_num_threads());
    let tile = Tile {
        heads,
        d,
        m,
        block_k: blocks.k,
        scale: (1.0 / (d as f64).sqrt()) as f32,
        simd: Simd::detect(),
    };
    out.par_chunks_mut(n * c)
        .enumerate()
        .flat_map(|(batch, out)| {
            out.par_chunks_mut(rows * c)
                .enumerate()
                .map(move |(i, out)| (batch, i * rows, out))
        })
        .for_each_init(
            || Scratch {
                scores: vec![0.0; rows * blocks.k],
                acc: vec![0.0; rows * d],
                max: vec![0.0; rows],
                sum: vec![0.0; rows],
            },
            |scratch, (batch, first, out)| {
                for head in 0..heads {
                    tile.run(q, k, v, batch, head, first, out, scratch);
                }
            },
        );
    out
}

/// Query rows per task: `block_q`, or fewer when that would leave threads idle.
fn task_rows(b: usize, n: usize, block_q: usize, threads: usize) -> usize {
    let per_batch = (2 * threads).div_ceil(b);
    n.div_ceil(per_batch).max(16).min(block_q).min(n)
}

/// What one task needs besides its operands and buffers.
struct Tile {
    heads: usize,
    d: usize,
    m: usize,
    block_k: usize,
    scale: f32,
    simd: Simd,
}

impl Tile {
    /// Attention of query rows `first..first + out.len() / (heads·d)` of `(batch, head)`
    /// into those rows' `head` columns of `out`.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        q: &Operand,
        k: &Operand,
        v: &Operand,
        batch: usize,
        head: usize,
        first: usize,
        out: &mut [f32],
        scratch: &mut Scratch,
    ) {
        let Self {
            heads,
            d,
            m,
            block_k,
            scale,
            simd,
        } = *self;
        let c = heads * d;
        let rows = out.len() / c;
        let col = head * d;
        let Scratch {
            scores,
            acc,
            max,
            sum,
        } = scratch;
        let acc = &mut acc[..rows * d];
        acc.fill(0.0);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        let q_blk = q.ptr(batch, first, col);
        for key in (0..m).step_by(block_k) {
            let cols = block_k.min(m - key);
            // SAFETY: `scores` holds `rows × block_k` elements and the product writes
            // `rows × cols` of them with row stride `block_k` (`cols ≤ block_k`). The
            // product reads query rows `first..first + rows` and keys `key..key + cols`,
            // channels `col..col + d`, all within the operands' ranges (`Operand::new`
            // checked the storages hold them). `scores` is this task's own buffer, so
            // nothing else reads or writes it meanwhile.
            unsafe {
                gemm::gemm(
                    rows,
                    cols,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    block_k as isize,
                    false,
                    q_blk,
                    q.channel_stride(),
                    q.token_stride(),
                    k.ptr(batch, key, col),
                    k.token_stride(),
                    k.channel_stride(),
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for r in 0..rows {
                let row = &mut scores[r * block_k..r * block_k + cols];
                let (new_max, block_sum) = simd.exp_shifted(row, max[r]);
                // exp(-inf) = 0 on the first block, where the accumulator is zero anyway.
                let correction = (max[r] - new_max).exp();
                if correction != 1.0 {
                    for a in &mut acc[r * d..(r + 1) * d] {
                        *a *= correction;
                    }
                }
                sum[r] = sum[r] * correction + block_sum;
                max[r] = new_max;
            }
            // SAFETY: `acc` holds `rows × d` elements written with row stride `d`;
            // `scores` holds the `rows × cols` tile just written (row stride `block_k`);
            // the values read are rows `key..key + cols`, channels `col..col + d` of `v`,
            // within its range as for the keys above. The three buffers do not overlap.
            unsafe {
                gemm::gemm(
                    rows,
                    d,
                    cols,
                    acc.as_mut_ptr(),
                    1,
                    d as isize,
                    true,
                    scores.as_ptr(),
                    1,
                    block_k as isize,
                    v.ptr(batch, key, col),
                    v.channel_stride(),
                    v.token_stride(),
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        }
        for ((out, acc), sum) in out.chunks_exact_mut(c).zip(acc.chunks_exact(d)).zip(&*sum) {
            let inv = 1.0 / sum;
            for (o, a) in out[col..col + d].iter_mut().zip(acc) {
                *o = a * inv;
            }
        }
    }
}

/// The compiled variant of the exponential pass this CPU runs.
#[derive(Debug, Clone, Copy)]
enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// See [`exp_shifted`].
    fn exp_shifted(self, row: &mut [f32], max: f32) -> (f32, f32) {
        match self {
            Self::Portable => exp_shifted(row, max),
            // SAFETY: `detect` returns these variants only where the CPU has the features.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { x86::exp_shifted_avx2(row, max) },
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { x86::exp_shifted_avx512(row, max) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// [`super::exp_shifted`] compiled for AVX2 and FMA.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_avx2(row: &mut [f32], max: f32) -> (f32, f32) {
        super::exp_shifted(row, max)
    }

    /// [`super::exp_shifted`] compiled for AVX-512.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_shifted_avx512(row: &mut [f32], max: f32) -> (f32, f32) {
        super::exp_shifted(row, max)
    }
}

/// Lanes of the explicit accumulators, so that the loops vectorise.
const LANES: usize = 16;

/// Replaces each `x` in `row` by `exp(x - new_max)` where `new_max` is the larger of
/// `max` and the row's maximum; returns `new_max` and the sum of the exponentials.
#[inline(always)]
fn exp_shifted(row: &mut [f32], max: f32) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l = if x > *l { x } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(max, |m, &x| if x > m { x } else { m });

    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *x = exp(*x - max);
            *l += *x;
        }
    }
    let mut sum = 0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        sum += *x;
    }
    (max, sum + lanes.iter().sum::<f32>())
}

/// `exp(x)` to about 2 ulp for `x ≤ 88`, 0 below `-87.3` (where f32 results would be
/// subnormal); branch-free so that loops over it vectorise. Cody–Waite reduction
/// `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and the Cephes `expf` polynomial for `e^r`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LO: f32 = -87.3;
    const HI: f32 = 88.0;
    // 1.5·2²³: adding it rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = if x < LO { LO } else { x };
    let xc = if xc > HI { HI } else { xc };
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * (r * r) + r + 1.0;
    // 2ⁿ from the integer in `t`'s mantissa; `n` lies in [-126, 127].
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let pow2 = f32::from_bits(((n + 127) << 23) as u32);
    if x < LO {
        0.0
    } else {
        p * pow2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The tiled kernel with the given tiles against the materialising path.
    fn check(shape: (usize, usize, usize, usize, usize), blocks: Blocks) {
        let (b, heads, n, m, d) = shape;
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (b, n, heads * d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (b, m, heads * d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (b, m, heads * d), &dev).unwrap();
        let expected = crate::blocks::attention_chunked(&q, &k, &v, heads, usize::MAX).unwrap();
        let got = q
            .apply_op3_no_bwd(&k, &v, &TiledAttention { heads, blocks })
            .unwrap();
        assert_eq!(got.dims(), expected.dims());
        let diff = max_abs(&(&got - &expected).unwrap());
        let scale = max_abs(&v);
        assert!(
            diff <= 1e-5 * scale,
            "{shape:?} {blocks:?}: max |diff| {diff}, scale {scale}"
        );
    }

    #[test]
    fn matches_materialized_attention() {
        // (b, heads, n, m, d): self-attention, cross-attention over 77 tokens, block
        // sizes that do not divide n or m, the UNet's and the VAE's head widths.
        let shapes = [
            (1, 1, 64, 64, 40),
            (2, 8, 300, 300, 40),
            (2, 8, 257, 77, 40),
            (1, 8, 130, 77, 64),
            (2, 1, 200, 333, 80),
            (1, 8, 1030, 1030, 80),
            (2, 1, 100, 77, 160),
            (1, 1, 256, 256, 512),
            (1, 1, 5, 3, 7),
        ];
        for shape in shapes {
            check(
                shape,
                Blocks {
                    q: BLOCK_Q,
                    k: BLOCK_K,
                },
            );
        }
    }

    #[test]
    fn small_tiles_match_materialized_attention() {
        // Many key blocks per row, a partial last block of keys and of queries.
        for blocks in [
            Blocks { q: 16, k: 16 },
            Blocks { q: 7, k: 5 },
            Blocks { q: 64, k: 1 },
        ] {
            check((2, 2, 45, 53, 40), blocks);
            check((1, 8, 33, 77, 64), blocks);
        }
    }

    #[test]
    fn large_scores_stay_finite() {
        // Scores in the hundreds: exp would overflow without the running maximum. Both
        // f32 paths then carry rounding errors of about 1e-7 of the scores' size, so
        // compare each with the materialising path in f64.
        let dev = Device::Cpu;
        let q = (Tensor::randn(0f32, 1., (1, 100, 64), &dev).unwrap() * 10.0).unwrap();
        let k = (Tensor::randn(0f32, 1., (1, 90, 64), &dev).unwrap() * 10.0).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 90, 64), &dev).unwrap();
        let f64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        let exact =
            crate::blocks::attention_chunked(&f64(&q), &f64(&k), &f64(&v), 2, usize::MAX).unwrap();
        let err = |t: Tensor| {
            (f64(&t) - &exact)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let reference = err(crate::blocks::attention_chunked(&q, &k, &v, 2, usize::MAX).unwrap());
        let tiled = err(tiled_attention(&q, &k, &v, 2).unwrap());
        assert!(
            tiled.is_finite() && tiled <= 2.0 * reference + 1e-6,
            "{tiled} vs {reference}"
        );
    }

    #[test]
    fn strided_operands() {
        // Keys and values broadcast over the batch (stride 0), queries transposed.
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 80, 70), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let kv = Tensor::randn(0f32, 1., (1, 77, 160), &dev).unwrap();
        let k = kv
            .narrow(2, 0, 80)
            .unwrap()
            .broadcast_as((2, 77, 80))
            .unwrap();
        let v = kv
            .narrow(2, 80, 80)
            .unwrap()
            .broadcast_as((2, 77, 80))
            .unwrap();
        let expected = crate::blocks::attention_chunked(&q, &k, &v, 2, usize::MAX).unwrap();
        let got = tiled_attention(&q, &k, &v, 2).unwrap();
        let diff = max_abs(&(&got - &expected).unwrap());
        assert!(diff <= 1e-5 * max_abs(&v), "max |diff| {diff}");
        // Batch entries with the same keys and values differ only through the queries.
        let one = tiled_attention(
            &q.i(1..2).unwrap(),
            &k.i(1..2).unwrap(),
            &v.i(1..2).unwrap(),
            2,
        )
        .unwrap();
        assert_eq!(max_abs(&(one - got.i(1..2).unwrap()).unwrap()), 0.0);
    }

    #[test]
    fn no_keys_give_zeros() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 4, 8), &dev).unwrap();
        let kv = Tensor::zeros((1, 0, 8), candle_core::DType::F32, &dev).unwrap();
        let got = tiled_attention(&q, &kv, &kv, 2).unwrap();
        assert_eq!(got.dims(), &[1, 4, 8]);
        assert_eq!(max_abs(&got), 0.0);
    }

    #[test]
    fn rejects_mismatched_operands() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 3, 6), candle_core::DType::F32, &dev).unwrap();
        assert!(tiled_attention(&q, &k, &k, 2).is_err());
        assert!(tiled_attention(&q, &q, &q, 3).is_err());
        let h = q.to_dtype(candle_core::DType::F16).unwrap();
        assert!(tiled_attention(&h, &h, &h, 2).is_err());
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn task_rows_keep_threads_busy() {
        assert_eq!(task_rows(2, 4096, 64, 2), 64);
        assert_eq!(task_rows(1, 4096, 64, 64), 32);
        assert_eq!(task_rows(2, 64, 64, 16), 16);
        assert_eq!(task_rows(1, 5, 64, 2), 5);
    }
}
