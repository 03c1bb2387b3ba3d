//! The linear layers of the models: candle's `Linear`, answering inputs without rows.
//!
//! candle-nn's `Linear` (0.11) flattens a 3-D or 4-D input to a matrix and reshapes the
//! product back with an inferred last dimension, which fails with "cannot reshape tensor
//! of 0 elements" when the input has no rows (an empty batch or no tokens). Here such an
//! input gives the empty output of the right shape; every other input is candle's.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `x·Wᵀ + b` over the last dimension, as `torch.nn.Linear`.
#[derive(Debug, Clone)]
pub(crate) struct Linear(candle_nn::Linear);

/// A linear layer with a bias, from `weight` (`(out, in)`) and `bias`.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(in_dim, out_dim, vb).map(Linear)
}

/// A linear layer without bias, from `weight` (`(out, in)`).
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb).map(Linear)
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.0.weight().dims2()?;
        let Some((&last, rows)) = x.dims().split_last() else {
            candle_core::bail!("linear: a scalar input");
        };
        if rows.iter().product::<usize>() == 0 {
            if last != in_dim {
                candle_core::bail!("linear: {last} input features for a {in_dim}-wide layer");
            }
            let mut shape = rows.to_vec();
            shape.push(out_dim);
            return Tensor::zeros(shape, x.dtype(), x.device());
        }
        self.0.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle_core::{DType, Device};

    fn layer(in_dim: usize, out_dim: usize) -> (Linear, Tensor, Tensor) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1f32, (out_dim, in_dim), &dev).unwrap();
        let b = Tensor::randn(0f32, 1f32, out_dim, &dev).unwrap();
        let tensors = [
            ("weight".to_string(), w.clone()),
            ("bias".to_string(), b.clone()),
        ];
        let vb = VarBuilder::from_tensors(tensors.into(), DType::F32, &dev);
        (linear(in_dim, out_dim, vb).unwrap(), w, b)
    }

    #[test]
    fn equals_the_product_with_the_weights() {
        let (l, w, b) = layer(5, 3);
        let x = Tensor::randn(0f32, 1f32, (2, 4, 5), &Device::Cpu).unwrap();
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert!(max_diff(&l.forward(&x).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn zero_sized_inputs_give_empty_or_bias_outputs() {
        let dev = Device::Cpu;
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev).unwrap();
        let (l, _, _) = layer(3, 2);
        // No rows (candle's own layer fails to reshape these): empty outputs.
        for (shape, want) in [
            (&[1, 0, 3][..], &[1, 0, 2][..]),
            (&[0, 4, 3], &[0, 4, 2]),
            (&[2, 0, 5, 3], &[2, 0, 5, 2]),
            (&[0, 3], &[0, 2]),
        ] {
            assert_eq!(l.forward(&zeros(shape)).unwrap().dims(), want, "{shape:?}");
        }
        // Rows of the wrong width are refused even when there are none.
        let err = l.forward(&zeros(&[1, 0, 4])).unwrap_err().to_string();
        assert!(err.contains("4 input features for a 3-wide layer"), "{err}");
        // No output feature.
        let (l, _, _) = layer(3, 0);
        assert_eq!(l.forward(&zeros(&[2, 4, 3])).unwrap().dims(), &[2, 4, 0]);
        // No input feature: the empty sum is zero, so the output is the bias.
        let (l, _, b) = layer(0, 2);
        let y = l.forward(&zeros(&[2, 4, 0])).unwrap();
        let want = b.broadcast_as((2, 4, 2)).unwrap();
        assert_eq!(max_diff(&y, &want), 0.0);
    }
}
