//! [`ShardWriter`]: a safetensors file written front to back, one tensor at a time, with
//! its header computed from shapes and dtypes before any data.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;

use crate::checkpoint::header::encode_header;
use crate::error::{Error, Result};

/// Streams the tensors of one safetensors file in the order they were planned. Each tensor's
/// bytes may come in several pieces; a piece that overruns the planned tensors, or a finish
/// before every tensor is complete, is an error (the caller then drops the staged file).
#[derive(Debug)]
pub struct ShardWriter<W: Write> {
    out: BufWriter<W>,
    path: PathBuf,
    names: Vec<String>,
    lens: Vec<u64>,
    current: usize,
    written: u64,
}

impl<W: Write> ShardWriter<W> {
    /// Writes the header for `tensors` (name, dtype, shape, in file order) and
    /// `user_metadata` to `file` (a `File`, or `&mut File`); `path` names the output in
    /// errors.
    pub fn begin(
        file: W,
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        user_metadata: Option<HashMap<String, String>>,
    ) -> Result<Self> {
        let (header, lens) = encode_header(tensors, user_metadata, path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header).map_err(|e| Error::io(path, e))?;
        let mut writer = Self {
            out,
            path: path.to_path_buf(),
            names: tensors.iter().map(|t| t.0.clone()).collect(),
            lens,
            current: 0,
            written: 0,
        };
        writer.skip_empty();
        Ok(writer)
    }

    /// The name of the tensor the next bytes belong to (`None` when all are written).
    pub fn next_tensor(&self) -> Option<&str> {
        self.names.get(self.current).map(String::as_str)
    }

    /// Appends `bytes` to the current tensor, moving on to the next when it is complete.
    /// A piece may not span two tensors.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(&len) = self.lens.get(self.current) else {
            return Err(Error::checkpoint(
                &self.path,
                "more data than the planned tensors hold",
            ));
        };
        let len_now = self.written + bytes.len() as u64;
        if len_now > len {
            return Err(Error::checkpoint(
                &self.path,
                format!(
                    "tensor `{}`: {len_now} bytes written, {len} planned",
                    self.next_tensor().unwrap_or_default()
                ),
            ));
        }
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written = len_now;
        if self.written == len {
            self.current += 1;
            self.written = 0;
            self.skip_empty();
        }
        Ok(())
    }

    /// Checks that every planned tensor was written and flushes; returns the writer (the
    /// file, for the caller to sync).
    pub fn finish(self) -> Result<W> {
        if let Some(name) = self.next_tensor() {
            return Err(Error::checkpoint(
                &self.path,
                format!("tensor `{name}` was never completely written"),
            ));
        }
        let path = self.path;
        self.out
            .into_inner()
            .map_err(|e| Error::io(&path, e.into_error()))
    }

    /// Zero-size tensors need no bytes: step over them.
    fn skip_empty(&mut self) {
        while self.lens.get(self.current) == Some(&0) {
            self.current += 1;
        }
    }
}
