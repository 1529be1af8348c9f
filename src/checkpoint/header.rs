//! A safetensors file's header, read without reading its data, and a header computed from
//! shapes and dtypes before any data is written.
//!
//! The layout (safetensors' own): 8 bytes little-endian header length `n`, `n` bytes of JSON
//! (`{"__metadata__": {..}, "name": {"dtype", "shape", "data_offsets": [begin, end]}, ..}`,
//! padded with spaces to a multiple of 8), then the tensors' bytes, back to back, in offset
//! order.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use safetensors::tensor::{Dtype, Metadata, TensorInfo};

use crate::checkpoint::io::read_exact_at;
use crate::error::{Error, Result};

/// The largest header accepted (safetensors' own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The size of the header-length prefix.
const LEN_PREFIX: u64 = 8;

/// A parsed, validated safetensors header: tensors with their byte ranges in the file.
#[derive(Clone, Debug)]
pub struct SafetensorsHeader {
    tensors: Vec<StoredTensor>,
    by_name: HashMap<String, usize>,
    user_metadata: Option<HashMap<String, String>>,
}

/// One tensor of a header: its name, dtype, shape, and where its bytes lie in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTensor {
    /// The tensor's name.
    pub name: String,
    /// Its stored dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of its data in the file.
    pub offset: u64,
    /// Its data's length in bytes.
    pub len: u64,
}

impl SafetensorsHeader {
    /// Reads and validates the header of `file` (named `path` in errors): the length prefix,
    /// the JSON, the tensors' offsets (contiguous, each the size its dtype and shape imply),
    /// and that the data ends exactly at the end of the file. Reads only the header's bytes.
    pub fn read(file: &File, path: &Path) -> Result<Self> {
        let bad = |message: String| Error::SafeTensors {
            path: path.to_path_buf(),
            message,
        };
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < LEN_PREFIX {
            return Err(bad(format!(
                "file is {file_len} bytes, shorter than the 8-byte header length"
            )));
        }
        let mut prefix = [0u8; LEN_PREFIX as usize];
        read_exact_at(file, &mut prefix, 0).map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER_BYTES {
            return Err(bad(format!(
                "header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit"
            )));
        }
        if LEN_PREFIX + n > file_len {
            return Err(bad(format!(
                "header length {n} runs past the end of the {file_len}-byte file"
            )));
        }
        let mut json = vec![0u8; n as usize];
        read_exact_at(file, &mut json, LEN_PREFIX).map_err(|e| Error::io(path, e))?;
        // `Metadata`'s own deserializer checks the offsets: contiguous from 0, each tensor
        // exactly as long as its dtype and shape imply, no overflow.
        let metadata: Metadata =
            serde_json::from_slice(&json).map_err(|e| bad(format!("invalid header: {e}")))?;
        let data_start = LEN_PREFIX + n;
        let data_len = metadata.data_len() as u64;
        if data_start.checked_add(data_len) != Some(file_len) {
            return Err(bad(format!(
                "the header describes {data_len} data bytes but the file holds {} after the \
                 header (truncated, or trailing bytes)",
                file_len - data_start
            )));
        }
        let infos = metadata.tensors();
        let tensors: Vec<StoredTensor> = metadata
            .offset_keys()
            .into_iter()
            .filter_map(|name| {
                let info: &TensorInfo = infos.get(&name)?;
                let (begin, end) = info.data_offsets;
                Some(StoredTensor {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    offset: data_start + begin as u64,
                    len: (end - begin) as u64,
                    name,
                })
            })
            .collect();
        if let Some(t) = tensors.iter().find(|t| !shape_fits(&t.shape)) {
            return Err(bad(format!(
                "tensor `{}`: shape {:?} is too large to address",
                t.name, t.shape
            )));
        }
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            tensors,
            by_name,
            user_metadata: metadata.metadata().clone(),
        })
    }

    /// The tensors in file (offset) order.
    pub fn tensors(&self) -> &[StoredTensor] {
        &self.tensors
    }

    /// The tensor called `name`, if the file has it.
    pub fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The file's free-form `__metadata__` (e.g. `{"format": "pt"}`).
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.user_metadata.as_ref()
    }
}

/// Whether every stride of a `shape` is addressable: the product of its non-zero dimensions
/// fits in an `isize` (a zero-element tensor may otherwise declare `[0, 2^33, 2^33]`).
fn shape_fits(shape: &[usize]) -> bool {
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .is_some_and(|p| isize::try_from(p).is_ok())
}

/// The byte length of a tensor of `dtype` and `shape`, or `None` on overflow or a size that
/// is not a whole number of bytes.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<u64> {
    let elements = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let bits = elements.checked_mul(dtype.bitsize())?;
    (bits % 8 == 0).then_some((bits / 8) as u64)
}

/// The header of a file that will hold `tensors` (name, dtype, shape) back to back in the
/// given order, and `user_metadata`: the 8-byte length and the JSON padded to a multiple of
/// 8 bytes, as safetensors writes it. Returns the bytes and each tensor's data length.
pub fn encode_header(
    tensors: &[(String, Dtype, Vec<usize>)],
    user_metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let bad = |message: String| Error::SafeTensors {
        path: path.to_path_buf(),
        message,
    };
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(tensors.len());
    let mut lens = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        let len = byte_len(*dtype, shape)
            .ok_or_else(|| bad(format!("tensor `{name}`: size overflows")))?;
        let end = offset + len as usize;
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: *dtype,
                shape: shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        lens.push(len);
        offset = end;
    }
    let metadata = Metadata::new(user_metadata, infos).map_err(|e| bad(e.to_string()))?;
    let mut json = serde_json::to_vec(&metadata).map_err(|e| bad(e.to_string()))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = Vec::with_capacity(8 + json.len());
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    Ok((bytes, lens))
}
