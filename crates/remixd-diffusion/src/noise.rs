//! Where the random numbers of a run come from.
//!
//! The pipeline never draws noise itself: it asks a [`NoiseSource`] for each draw, in a
//! fixed order (the VAE posterior sample, the initial noise, then one draw per step for
//! ancestral schedulers). [`SeededNoise`] makes a run a pure function of its seed, on
//! any device; [`ReplayNoise`] feeds back the draws the reference implementation made,
//! which is how the parity tests compare whole runs.

use std::collections::VecDeque;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::{Error, Result};

/// Gives standard-normal tensors of the asked shape.
pub trait NoiseSource {
    /// One draw of `shape`, f32, on `device`.
    fn draw(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Standard-normal noise from a ChaCha8 stream: the same seed gives the same tensors on
/// every machine and device (the numbers are drawn on the CPU, then moved).
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn draw(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

/// Hands out recorded tensors in order; a draw of another shape, or one draw too many,
/// is an error (it means the pipeline's order of draws differs from the recording).
pub struct ReplayNoise {
    draws: VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(draws: impl IntoIterator<Item = Tensor>) -> Self {
        Self {
            draws: draws.into_iter().collect(),
        }
    }

    /// How many recorded draws were not used.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn draw(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.draws.pop_front().ok_or_else(|| {
            Error::Unsupported(format!("replay: no recorded draw left for shape {shape:?}"))
        })?;
        if t.dims() != shape {
            return Err(Error::Unsupported(format!(
                "replay: recorded draw has shape {:?}, the pipeline asked for {shape:?}",
                t.dims()
            )));
        }
        Ok(t.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_a_function_of_the_seed() {
        let d = Device::Cpu;
        let a = SeededNoise::new(7).draw(&[2, 3], &d).unwrap();
        let b = SeededNoise::new(7).draw(&[2, 3], &d).unwrap();
        let c = SeededNoise::new(8).draw(&[2, 3], &d).unwrap();
        let (a, b, c) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn seeded_noise_is_roughly_standard_normal() {
        let t = SeededNoise::new(1).draw(&[100_000], &Device::Cpu).unwrap();
        let v = t.to_vec1::<f32>().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn replay_checks_order_and_shape() {
        let d = Device::Cpu;
        let mut r = ReplayNoise::new([Tensor::zeros((1, 2), candle_core::DType::F32, &d).unwrap()]);
        assert!(
            r.draw(&[2, 1], &d).is_err(),
            "a draw of another shape is refused"
        );
        let mut r = ReplayNoise::new([Tensor::zeros((1, 2), candle_core::DType::F32, &d).unwrap()]);
        assert_eq!(r.draw(&[1, 2], &d).unwrap().dims(), &[1, 2]);
        assert_eq!(r.remaining(), 0);
        assert!(r.draw(&[1, 2], &d).is_err(), "one draw too many is refused");
    }
}
