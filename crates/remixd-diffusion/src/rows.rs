//! A `(batch, tokens, width)` f32 operand of a CPU custom op with unit-stride rows, read
//! row by row: what the FLUX.2 transformer's fused kernels and the packed attention
//! take (any batch and token strides, as views and narrowed tensors give them).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The operand: its storage, first offset, sizes and strides.
pub(crate) struct Rows<'a> {
    data: &'a [f32],
    start: usize,
    /// `[batch, tokens, width]`.
    pub(crate) dims: [usize; 3],
    batch_stride: usize,
    token_stride: usize,
}

impl<'a> Rows<'a> {
    /// Reads `storage` through `layout`; `what` names the operand in errors (e.g.
    /// "attention: q"). Refuses another dtype, another rank, rows that are not
    /// unit-stride, and a layout that runs past its storage.
    pub(crate) fn new(what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{what} is {:?}, not f32", storage.dtype());
        };
        let (Ok(&[b, s, w]), Ok(&[sb, ss, sw])) = (
            <&[usize; 3]>::try_from(layout.dims()),
            <&[usize; 3]>::try_from(layout.stride()),
        ) else {
            candle_core::bail!("{what} has shape {:?}, not 3-D", layout.dims());
        };
        if w > 1 && sw != 1 {
            candle_core::bail!("{what}: its rows are not unit-stride");
        }
        let rows = Self {
            data: data.as_slice(),
            start: layout.start_offset(),
            dims: [b, s, w],
            batch_stride: sb,
            token_stride: ss,
        };
        // Every row lies at or before the last one, so with this check no `row` runs past
        // the storage.
        if b * s * w > 0 && rows.offset(b - 1, s - 1) + w > rows.data.len() {
            candle_core::bail!("{what}: its layout runs past its storage");
        }
        Ok(rows)
    }

    fn offset(&self, batch: usize, token: usize) -> usize {
        self.start + batch * self.batch_stride + token * self.token_stride
    }

    /// The `width` values of row `(batch, token)`.
    pub(crate) fn row(&self, batch: usize, token: usize) -> &'a [f32] {
        self.part(batch, token, 0, self.dims[2])
    }

    /// Values `from..from + len` of row `(batch, token)`.
    pub(crate) fn part(&self, batch: usize, token: usize, from: usize, len: usize) -> &'a [f32] {
        let first = self.offset(batch, token) + from;
        &self.data[first..first + len]
    }
}
