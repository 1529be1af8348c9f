//! Positioned reads: one tensor's bytes from a file, never the whole file.

use std::fs::File;

use candle_core::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

/// Fills `buf` from `file` starting at byte `offset`, without moving a shared cursor (so
/// several threads may read one `File`).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut done, mut buf) = (0u64, buf);
        while !buf.is_empty() {
            match std::os::windows::fs::FileExt::seek_read(file, buf, offset + done) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "failed to fill whole buffer",
                    ))
                }
                Ok(n) => {
                    done += n as u64;
                    buf = &mut buf[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A candle tensor from safetensors bytes (any dtype candle reads).
pub(crate) fn tensor_from_bytes(
    dtype: Dtype,
    shape: &[usize],
    bytes: &[u8],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let view = TensorView::new(dtype, shape.to_vec(), bytes)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    candle_core::safetensors::Load::load(&view, device)
}
