//! `lorakit merge`: fold a PEFT adapter into a base model's safetensors file, as PEFT's
//! `merge_and_unload()` does, keeping every other tensor byte for byte.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView, View};

use crate::error::{Error, Result};
use crate::frozen::FrozenLinear;
use crate::model::plan::Linear;
use crate::peft::load::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};
use crate::peft::save::write_atomic;

/// What [`merge_files`] did.
#[derive(Clone, Debug)]
pub struct MergeReport {
    /// The module paths whose weights were merged, in file order.
    pub merged: Vec<String>,
    /// Number of tensors written.
    pub tensors: usize,
}

/// A tensor of the output: unchanged bytes from the base file, or a merged weight.
enum OutTensor<'a> {
    Raw(TensorView<'a>),
    Merged(Tensor),
}

impl View for &OutTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            OutTensor::Raw(v) => v.dtype(),
            OutTensor::Merged(t) => View::dtype(t),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Raw(v) => v.shape(),
            OutTensor::Merged(t) => View::shape(t),
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Raw(v) => Cow::Borrowed(v.data()),
            OutTensor::Merged(t) => View::data(t),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutTensor::Raw(v) => v.data().len(),
            OutTensor::Merged(t) => View::data_len(t),
        }
    }
}

/// Errors if `out` is one of `inputs` (same file after resolving links).
fn refuse_overwrite(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    let Ok(out_real) = std::fs::canonicalize(out) else {
        return Ok(()); // does not exist yet
    };
    for input in inputs {
        if std::fs::canonicalize(input).is_ok_and(|i| i == out_real) {
            return Err(Error::file_config(
                out,
                "--out",
                format!("refusing to overwrite the input {}", input.display()),
            ));
        }
    }
    Ok(())
}

/// Writes `out`: every tensor of the safetensors file `base`, with the adapter in
/// `adapter_dir` merged into the weights it targets (`<path>.weight`), in the base's dtype
/// (computed in f32). The merge uses each variant's own merge code. The file is written
/// to a temporary name and renamed; `out` may not be one of the inputs.
pub fn merge_files(base: &Path, adapter_dir: &Path, out: &Path) -> Result<MergeReport> {
    refuse_overwrite(
        out,
        &[
            base.to_path_buf(),
            adapter_dir.join(CONFIG_FILE),
            adapter_dir.join(WEIGHTS_FILE),
            adapter_dir.to_path_buf(),
        ],
    )?;
    let adapter = PeftAdapter::load(adapter_dir, &Device::Cpu)?;
    let plan = adapter.plan()?;
    let bytes = std::fs::read(base).map_err(|e| Error::io(base, e))?;
    let st_err = |e: safetensors::SafeTensorError| Error::SafeTensors {
        path: base.to_path_buf(),
        message: e.to_string(),
    };
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(st_err)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(st_err)?;

    let mut merged = Vec::new();
    let mut outputs: Vec<(String, OutTensor)> = Vec::new();
    let mut views = st.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in views {
        let target = name
            .strip_suffix(".weight")
            .filter(|p| view.shape().len() == 2 && plan.is_target(p))
            .map(str::to_string);
        let Some(path) = target else {
            outputs.push((name, OutTensor::Raw(view)));
            continue;
        };
        let w = candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(|e| {
            Error::SafeTensors {
                path: base.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            }
        })?;
        let dtype = w.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(Error::Unsupported {
                what: "base weight dtype",
                got: format!("{dtype:?} for `{name}`"),
                supported: "F32, F16, BF16, F64".to_string(),
            });
        }
        let frozen = FrozenLinear::new(w.to_dtype(DType::F32)?, None)?;
        let Linear::Adapted(layer) = plan.adapt(&path, frozen)? else {
            outputs.push((name, OutTensor::Raw(view)));
            continue;
        };
        let mut layer = layer.write();
        layer.merge(true)?;
        let weight = layer.base().weight().to_dtype(dtype)?;
        merged.push(path);
        outputs.push((name, OutTensor::Merged(weight)));
    }
    plan.finish()?;

    let count = outputs.len();
    let data = safetensors::serialize(
        outputs.iter().map(|(n, t)| (n.as_str(), t)),
        meta.metadata().clone(),
    )
    .map_err(|e| Error::SafeTensors {
        path: out.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(out, &data)?;
    Ok(MergeReport {
        merged,
        tensors: count,
    })
}
