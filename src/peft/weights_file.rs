//! Which weights file an adapter folder has, and reading it: `adapter_model.safetensors`,
//! or the `adapter_model.bin` PEFT wrote before it saved safetensors by default (0.6,
//! 2023; many adapters on the Hub are still in that form).
//!
//! A `.bin` file is a `torch.save` pickle of the state dict, read without running code and
//! with every tensor's size checked against the file first
//! ([`PickleFile`]). A tensor candle's reader cannot
//! rebuild is left out, and the adapter is then refused by the loader ("missing tensor").

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::checkpoint::pickle::PickleFile;
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
fn read_pickle(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let file = PickleFile::open(path)?;
    file.names()
        .map(|name| Ok((name.to_string(), file.tensor(name)?.to_device(device)?)))
        .collect()
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
