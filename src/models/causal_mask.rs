//! [`CausalMask`]: a decoder forward's causal attention mask, as the fused attention op
//! takes it (the left padding and a sliding window) and, built only when asked for, as the
//! additive tensor candle's composed attention adds to its scores. On f32 CPU tensors the
//! fused op runs and the tensor is never built: for a left-padded batch of 8 rows of 2048
//! tokens it would hold 32 M floats per forward.

use std::sync::OnceLock;

use candle_core::{Device, Tensor};

use super::padding;
use crate::error::Result;

/// The mask of queries in slots `offset..offset + q_len` over keys in slots `0..kv_len`
/// (a KV cache holds the first `offset`): causal, within `window` slots when given, each
/// row's left padding `pads` hidden (`models::padding`).
#[derive(Debug)]
pub(crate) struct CausalMask {
    q_len: usize,
    kv_len: usize,
    offset: usize,
    window: Option<usize>,
    pads: Option<Vec<usize>>,
    /// The unit dimensions between the batch and the queries of a padded mask (the heads'
    /// axes of the scores it is added to).
    head_axes: usize,
    device: Device,
    additive: OnceLock<Tensor>,
}

impl CausalMask {
    /// The mask of one forward (see the type); `head_axes`: how many unit dimensions a
    /// padded mask has between its batch and its queries.
    pub(crate) fn new(
        (q_len, kv_len, offset): (usize, usize, usize),
        window: Option<usize>,
        pads: Option<&[usize]>,
        head_axes: usize,
        device: &Device,
    ) -> Self {
        Self {
            q_len,
            kv_len,
            offset,
            window,
            pads: pads.map(<[usize]>::to_vec),
            head_axes,
            device: device.clone(),
            additive: OnceLock::new(),
        }
    }

    /// The sliding window, if any.
    pub(crate) fn window(&self) -> Option<usize> {
        self.window
    }

    /// A left-padded batch's padding per row.
    pub(crate) fn pads(&self) -> Option<&[usize]> {
        self.pads.as_deref()
    }

    /// The additive mask (0 where a key is seen, −∞ elsewhere), f32: `(q_len, kv_len)`, or
    /// `(batch, 1 …, q_len, kv_len)` with `head_axes` ones for a left-padded batch. Built
    /// on the first call.
    pub(crate) fn additive(&self) -> Result<&Tensor> {
        if let Some(mask) = self.additive.get() {
            return Ok(mask);
        }
        let (q_len, kv_len) = (self.q_len, self.kv_len);
        let values = padding::mask_values(self.pads(), q_len, kv_len, self.offset, self.window);
        let dims: Vec<usize> = match self.pads() {
            Some(pads) => std::iter::once(pads.len())
                .chain(std::iter::repeat_n(1, self.head_axes))
                .chain([q_len, kv_len])
                .collect(),
            None => vec![q_len, kv_len],
        };
        let mask = Tensor::from_vec(values, dims, &Device::Cpu)?.to_device(&self.device)?;
        Ok(self.additive.get_or_init(|| mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The additive tensor is `padding::mask_values` in the documented shapes, built once.
    #[test]
    fn the_additive_mask_is_the_padding_rule_in_its_shape() {
        let dev = Device::Cpu;
        let plain = CausalMask::new((3, 5, 2), Some(2), None, 1, &dev);
        let want = padding::mask_values(None, 3, 5, 2, Some(2));
        let got = plain.additive().unwrap();
        assert_eq!(got.dims(), [3, 5]);
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert!(std::ptr::eq(got, plain.additive().unwrap()));

        let padded = CausalMask::new((4, 4, 0), None, Some(&[0, 2]), 2, &dev);
        let want = padding::mask_values(Some(&[0, 2]), 4, 4, 0, None);
        let got = padded.additive().unwrap();
        assert_eq!(got.dims(), [2, 1, 1, 4, 4]);
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert_eq!(padded.pads(), Some(&[0, 2][..]));
    }
}
