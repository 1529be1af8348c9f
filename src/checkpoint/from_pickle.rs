//! [`convert_pickle_checkpoint`]: a model saved as PyTorch pickles (`pytorch_model.bin`, or
//! shards with `pytorch_model.bin.index.json`) rewritten as safetensors, one tensor at a
//! time and without running code, so that every other part of lorakit (models, merges,
//! generation) can read it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::checkpoint::pickle::PickleFile;
use crate::checkpoint::source::{companion_files, INDEX_FILE, SINGLE_FILE};
use crate::checkpoint::writer::ShardWriter;
use crate::error::{Error, Result};
use crate::staging::StagedDir;

/// The single-file pickle checkpoint of a model folder.
pub const PICKLE_SINGLE_FILE: &str = "pytorch_model.bin";
/// The index of a sharded pickle checkpoint.
pub const PICKLE_INDEX_FILE: &str = "pytorch_model.bin.index.json";

/// What [`convert_pickle_checkpoint`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickleConversion {
    /// Tensors written.
    pub tensors: usize,
    /// Safetensors files written (`model.safetensors`, or one shard per pickle shard).
    pub shards: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// The folder's other files, copied (configs, tokenizer files).
    pub copied: Vec<String>,
}

/// Rewrites the pickle checkpoint of the model folder `src` as a safetensors model folder
/// `out`: `pytorch_model.bin` becomes `model.safetensors`; shards listed in
/// `pytorch_model.bin.index.json` become `model-0000i-of-0000n.safetensors` with a
/// `model.safetensors.index.json`, each tensor in the shard it had. Names, dtypes, shapes
/// and values are kept (tensors that shared storage, such as tied embeddings, are written
/// once each); the folder's other files (config.json, tokenizer files) are copied. Reads one
/// tensor at a time ([`PickleFile`]: no code runs, sizes checked first); the output is built
/// beside `out` and renamed into place, so an error leaves nothing.
///
/// Errors: no pickle checkpoint in `src`, an unreadable or inconsistent one (an index
/// naming a tensor its shard lacks, a tensor in two shards), or an `out` that exists and is not an empty folder.
///
/// ```
/// use lorakit::checkpoint::from_pickle::convert_pickle_checkpoint;
/// use lorakit::checkpoint::Checkpoint;
/// # fn main() -> lorakit::Result<()> {
/// // A tiny Qwen2 as transformers 4 saved it: three pytorch_model-0000i-of-00003.bin shards.
/// let src = std::path::Path::new("tests/fixtures/peft_pickle/models/qwen2_sharded");
/// let out = std::env::temp_dir().join(format!("lorakit-doc-convert-{}", std::process::id()));
/// let done = convert_pickle_checkpoint(src, &out)?;
/// assert_eq!((done.shards, done.copied.len()), (3, 2)); // config.json, generation_config.json
/// assert_eq!(Checkpoint::open(&out)?.len(), done.tensors);
/// // The destination is now taken: a second conversion is refused, and writes nothing.
/// assert!(convert_pickle_checkpoint(src, &out).is_err());
/// # std::fs::remove_dir_all(&out).ok();
/// # Ok(()) }
/// ```
pub fn convert_pickle_checkpoint(src: &Path, out: &Path) -> Result<PickleConversion> {
    let shards = pickle_shards(src)?;
    let staged = StagedDir::create(out)?;
    let count = shards.len();
    let mut weight_map = Map::new();
    let mut report = PickleConversion {
        tensors: 0,
        shards: count,
        bytes: 0,
        copied: Vec::new(),
    };
    for (i, (shard, expected)) in shards.iter().enumerate() {
        let name = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let file = PickleFile::open(shard)?;
        if let Some(missing) = expected.iter().find(|n| !file.names().any(|m| m == *n)) {
            return Err(Error::checkpoint(
                shard,
                format!("{PICKLE_INDEX_FILE} places `{missing}` in this shard, which lacks it"),
            ));
        }
        if let Some(twice) = file.names().find(|n| weight_map.contains_key(*n)) {
            return Err(Error::checkpoint(
                shard,
                format!("`{twice}` is also in an earlier shard; a tensor must have one place"),
            ));
        }
        let written = write_shard(&file, &staged.path().join(&name))?;
        for tensor in file.names() {
            weight_map.insert(tensor.to_string(), Value::String(name.clone()));
        }
        report.tensors += file.infos().len();
        report.bytes += written;
    }
    if count > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": report.bytes },
            "weight_map": weight_map,
        });
        let path = staged.path().join(INDEX_FILE);
        let text = serde_json::to_string_pretty(&index).map_err(|e| Error::json(&path, &e))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    for file in companion_files(src, |_| false)? {
        let name = file.file_name().unwrap_or_default().to_owned();
        let dest = staged.path().join(&name);
        std::fs::copy(&file, &dest).map_err(|e| Error::io(&file, e))?;
        report.copied.push(name.to_string_lossy().into_owned());
    }
    staged.commit()?;
    Ok(report)
}

/// The pickle files of the folder `src`, each with the tensors its index places there
/// (empty for a single file).
fn pickle_shards(src: &Path) -> Result<Vec<(PathBuf, Vec<String>)>> {
    if !src.is_dir() {
        return Err(Error::checkpoint(
            src,
            format!("not a model folder (give the folder holding {PICKLE_SINGLE_FILE} or {PICKLE_INDEX_FILE})"),
        ));
    }
    let index_path = src.join(PICKLE_INDEX_FILE);
    if index_path.is_file() {
        let text = crate::error::read_text(&index_path)?;
        let index: Value = serde_json::from_str(&text).map_err(|e| Error::json(&index_path, &e))?;
        let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
            return Err(Error::file_config(
                &index_path,
                "weight_map",
                "missing, or not an object of tensor name → shard file",
            ));
        };
        let mut by_shard: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, shard) in map {
            let Some(shard) = shard.as_str().filter(|s| is_plain_file_name(s)) else {
                return Err(Error::file_config(
                    &index_path,
                    "weight_map",
                    format!("`{tensor}` maps to {shard}, not a file name in this folder"),
                ));
            };
            by_shard
                .entry(shard.to_string())
                .or_default()
                .push(tensor.clone());
        }
        return Ok(by_shard
            .into_iter()
            .map(|(shard, tensors)| (src.join(shard), tensors))
            .collect());
    }
    let single = src.join(PICKLE_SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![(single, Vec::new())]);
    }
    Err(Error::checkpoint(
        src,
        format!("no {PICKLE_SINGLE_FILE} or {PICKLE_INDEX_FILE} in this folder"),
    ))
}

/// A bare file name (no folder part, not `.` or `..`).
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\'])
}

/// Writes every tensor of `file` to the safetensors file `path`; returns the data bytes.
fn write_shard(file: &PickleFile, path: &Path) -> Result<u64> {
    let planned: Vec<_> = file
        .infos()
        .iter()
        .map(|i| {
            Ok((
                i.name.clone(),
                dtype_of(i.dtype, path)?,
                i.layout.dims().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let out = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut writer = ShardWriter::begin(out, path, &planned, Some(metadata))?;
    let mut bytes = 0u64;
    for (name, _, _) in &planned {
        let tensor = file.tensor(name)?;
        let data = tensor_bytes(&tensor)?;
        bytes += data.len() as u64;
        writer.write(&data)?;
    }
    let out = writer.finish()?;
    out.sync_all().map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The little-endian bytes of a contiguous CPU tensor.
fn tensor_bytes(tensor: &candle_core::Tensor) -> Result<Vec<u8>> {
    use safetensors::View;
    Ok(tensor.data().into_owned())
}

fn dtype_of(dtype: candle_core::DType, path: &Path) -> Result<safetensors::Dtype> {
    use candle_core::DType as D;
    use safetensors::Dtype as S;
    Ok(match dtype {
        D::F32 => S::F32,
        D::F16 => S::F16,
        D::BF16 => S::BF16,
        D::F64 => S::F64,
        D::U8 => S::U8,
        D::U32 => S::U32,
        D::I64 => S::I64,
        other => {
            return Err(Error::checkpoint(
                path,
                format!("a {other:?} tensor has no safetensors form here"),
            ))
        }
    })
}
