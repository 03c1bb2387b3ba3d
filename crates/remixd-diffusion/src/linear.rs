//! The linear layers of the models: candle's `Linear`, answering inputs without rows and
//! keeping its weights at the precision they were stored in.
//!
//! candle-nn's `Linear` (0.11) flattens a 3-D or 4-D input to a matrix and reshapes the
//! product back with an inferred last dimension, which fails with "cannot reshape tensor
//! of 0 elements" when the input has no rows (an empty batch or no tokens). Here such an
//! input gives the empty output of the right shape; every other input is candle's.
//!
//! Weights loaded in half precision (FLUX.2's transformer and text encoder: 8 B
//! parameters, 32 GB in f32) stay so in memory and are widened to the input's dtype for
//! each product, so a CPU computes in f32 with half the resident weights; a weight
//! already in the input's dtype is used as it is.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `x·Wᵀ + b` over the last dimension, as `torch.nn.Linear`.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// A linear layer with a bias, from `weight` (`(out, in)`) and `bias`, in the
/// VarBuilder's dtype.
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((out_dim, in_dim), "weight")?,
        bias: Some(vb.get(out_dim, "bias")?),
    })
}

/// A linear layer without bias, from `weight` (`(out, in)`).
pub(crate) fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        weight: vb.get((out_dim, in_dim), "weight")?,
        bias: None,
    })
}

/// A linear layer with a bias when `bias` is set.
pub(crate) fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Linear> {
    if bias {
        linear(in_dim, out_dim, vb)
    } else {
        linear_no_bias(in_dim, out_dim, vb)
    }
}

/// A linear layer from its weight (`(out, in)`) and optional bias, e.g. several layers'
/// weights stacked into one product.
pub(crate) fn linear_from(weight: Tensor, bias: Option<Tensor>) -> Linear {
    Linear { weight, bias }
}

impl Linear {
    /// The weight, `(out, in)`, at its stored dtype.
    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// `t` in `dtype`: itself when it already is (no copy).
pub(crate) fn widened(t: &Tensor, dtype: candle_core::DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
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
        let weight = widened(&self.weight, x.dtype())?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| widened(b, x.dtype()))
            .transpose()?;
        candle_nn::Linear::new(weight, bias).forward(x)
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
    fn half_precision_weights_are_widened_to_the_input() {
        let dev = Device::Cpu;
        let (l, w, b) = layer(6, 4);
        let tensors = [
            ("weight".to_string(), w.to_dtype(DType::BF16).unwrap()),
            ("bias".to_string(), b.to_dtype(DType::BF16).unwrap()),
        ];
        let vb = VarBuilder::from_tensors(tensors.into(), DType::BF16, &dev);
        let half = linear(6, 4, vb).unwrap();
        assert_eq!(
            half.weight().dtype(),
            DType::BF16,
            "kept at its stored dtype"
        );
        let x = Tensor::randn(0f32, 1f32, (3, 6), &dev).unwrap();
        let y = half.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::F32, "computed in the input's dtype");
        // Only the weights' rounding to bf16 (8 bits of mantissa) separates the two.
        let full = l.forward(&x).unwrap();
        assert!(max_diff(&y, &full) < 0.05, "{}", max_diff(&y, &full));
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
