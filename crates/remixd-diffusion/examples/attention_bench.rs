//! Times the tiled CPU attention against the materialising candle-ops path on the
//! Stable Diffusion 1.5 attention shapes at 512² pixels (batch 2 for classifier-free
//! guidance).
//!
//! `cargo run --release -p remixd-diffusion --example attention_bench [runs]`
//!
//! The two paths alternate within each shape so that both see the same machine load;
//! the figures are medians over `runs` (default 5) after one warm-up call each. Both
//! use candle's thread count (`RAYON_NUM_THREADS`, else every core).

use std::time::Instant;

use candle_core::{Device, Tensor};
use remixd_diffusion::attention::{materialized_attention, tiled_attention};

/// (name, batch, heads, query tokens, key tokens, head width)
const SHAPES: [(&str, usize, usize, usize, usize, usize); 4] = [
    ("UNet self-attention 64×64", 2, 8, 4096, 4096, 40),
    ("UNet self-attention 32×32", 2, 8, 1024, 1024, 80),
    ("UNet cross-attention 64×64", 2, 8, 4096, 77, 40),
    ("VAE mid-block attention 64×64", 1, 1, 4096, 4096, 512),
];

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn time(f: impl Fn() -> candle_core::Result<Tensor>) -> (f64, Tensor) {
    let start = Instant::now();
    let out = f().expect("attention");
    (start.elapsed().as_secs_f64(), out)
}

fn main() -> candle_core::Result<()> {
    let runs: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse().expect("runs: a positive integer"),
        None => 5,
    };
    let dev = Device::Cpu;
    println!(
        "threads {}, {runs} runs per path, median seconds",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<32} {:>22} {:>12} {:>10} {:>7} {:>10}",
        "shape", "(b·heads, n, m, d)", "materialized", "tiled", "ratio", "max |diff|"
    );
    for (name, b, heads, n, m, d) in SHAPES {
        let q = Tensor::randn(0f32, 1., (b, n, heads * d), &dev)?;
        let k = Tensor::randn(0f32, 1., (b, m, heads * d), &dev)?;
        let v = Tensor::randn(0f32, 1., (b, m, heads * d), &dev)?;
        let old = || materialized_attention(&q, &k, &v, heads);
        let new = || tiled_attention(&q, &k, &v, heads);
        let (_, expected) = time(old);
        let (_, got) = time(new);
        let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let (mut olds, mut news) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            olds.push(time(old).0);
            news.push(time(new).0);
        }
        let (old, new) = (median(olds), median(news));
        println!(
            "{name:<32} {:>22} {old:>12.3} {new:>10.3} {:>6.2}× {diff:>10.2e}",
            format!("({}, {n}, {m}, {d})", b * heads),
            old / new,
        );
    }
    Ok(())
}
