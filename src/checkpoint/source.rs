//! [`Checkpoint`]: a model's weights as users have them — one `.safetensors` file, a model
//! folder, or a sharded folder's `model.safetensors.index.json` — opened without reading
//! any tensor data.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use crate::checkpoint::header::{SafetensorsHeader, StoredTensor};
use crate::checkpoint::io::{read_exact_at, tensor_from_bytes};
use crate::error::{Error, Result};

/// The single-file name transformers' `save_pretrained` writes.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index name transformers' `save_pretrained` writes for a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// How the user named the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Given {
    /// A `.safetensors` file.
    File,
    /// A model folder.
    Folder,
    /// A `*.safetensors.index.json` file.
    Index,
}

/// One safetensors file of a checkpoint, open for positioned reads.
#[derive(Debug)]
pub struct Shard {
    /// Its file name in the folder (`model-00001-of-00004.safetensors`).
    pub file_name: String,
    /// Its full path.
    pub path: PathBuf,
    /// Its parsed header.
    pub header: SafetensorsHeader,
    file: File,
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let header = SafetensorsHeader::read(&file, &path)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self {
            file_name,
            path,
            header,
            file,
        })
    }

    /// Fills `buf` with the shard's bytes from absolute `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_exact_at(&self.file, buf, offset).map_err(|e| Error::io(&self.path, e))
    }

    /// The bytes of one of this shard's tensors.
    pub fn read_tensor_bytes(&self, tensor: &StoredTensor) -> Result<Vec<u8>> {
        let len = usize::try_from(tensor.len).map_err(|_| {
            Error::checkpoint(
                &self.path,
                format!("tensor `{}` is too large for this platform", tensor.name),
            )
        })?;
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, tensor.offset)?;
        Ok(buf)
    }
}

/// A model checkpoint: its shards (one for a single file) and which shard holds each tensor.
///
/// Opening reads and checks every header (and the index, for a sharded folder) but no tensor
/// data; [`Checkpoint::load`] then reads one tensor at a time.
///
/// ```no_run
/// use candle_core::Device;
/// use lorakit::checkpoint::Checkpoint;
/// # fn main() -> lorakit::Result<()> {
/// // A folder, its index file, or a single .safetensors file.
/// let ckpt = Checkpoint::open("models/Qwen2.5-0.5B")?;
/// let w = ckpt.load("model.layers.0.self_attn.q_proj.weight", &Device::Cpu)?;
/// println!("{} tensors in {} shard(s); q_proj {:?}", ckpt.len(), ckpt.shards().len(), w.dims());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Checkpoint {
    given: Given,
    path: PathBuf,
    folder: PathBuf,
    index: Option<(String, Map<String, Value>)>,
    shards: Vec<Shard>,
    location: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a model folder (`model.safetensors.index.json` with its
    /// shards, or `model.safetensors`; otherwise the folder's only index or only
    /// `.safetensors` file), or an index file. Errors name the file and what is wrong: a
    /// folder with no safetensors weights, an index naming a shard outside its folder or one
    /// that is missing, an index and shards that disagree on where a tensor is.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let (given_path, is_index) = find_in_folder(path)?;
            let mut ckpt = if is_index {
                Self::open_index(&given_path)?
            } else {
                Self::open_file(&given_path)?
            };
            ckpt.given = Given::Folder;
            ckpt.path = path.to_path_buf();
            return Ok(ckpt);
        }
        if !meta.is_file() {
            return Err(Error::checkpoint(
                path,
                "not a regular file or a folder".to_string(),
            ));
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.ends_with(".json")) {
            Self::open_index(path)
        } else {
            Self::open_file(path)
        }
    }

    fn open_file(path: &Path) -> Result<Self> {
        let shard = Shard::open(path.to_path_buf())?;
        let location = shard
            .header
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), 0))
            .collect();
        Ok(Self {
            given: Given::File,
            path: path.to_path_buf(),
            folder: parent_of(path),
            index: None,
            shards: vec![shard],
            location,
        })
    }

    fn open_index(path: &Path) -> Result<Self> {
        let text = crate::error::read_text(path)?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::json(path, &e))?;
        let Value::Object(index) = value else {
            return Err(Error::checkpoint(path, "the index is not a JSON object"));
        };
        let Some(Value::Object(weight_map)) = index.get("weight_map") else {
            return Err(Error::checkpoint(
                path,
                "the index has no `weight_map` object (tensor name → shard file)",
            ));
        };
        let folder = parent_of(path);
        // Tensor → shard file, and the shard files in name order.
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, file) in weight_map {
            let Value::String(file) = file else {
                return Err(Error::checkpoint(
                    path,
                    format!("weight_map entry `{tensor}` is not a file name"),
                ));
            };
            check_plain_file_name(file, path)?;
            wanted.insert(tensor, file);
        }
        if wanted.is_empty() {
            return Err(Error::checkpoint(path, "the index's weight_map is empty"));
        }
        let mut files: Vec<&str> = wanted.values().copied().collect();
        files.sort_unstable();
        files.dedup();
        check_shard_count(&files, path)?;
        let shards = files
            .iter()
            .map(|f| Shard::open(folder.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let shard_of: HashMap<&str, usize> =
            files.iter().enumerate().map(|(i, f)| (*f, i)).collect();
        let mut location = HashMap::with_capacity(wanted.len());
        for (&tensor, &file) in &wanted {
            let held = shard_of
                .get(file)
                .and_then(|&i| Some((i, shards.get(i)?.header.get(tensor)?)));
            let Some((i, _)) = held else {
                return Err(Error::checkpoint(
                    path,
                    format!("the index maps `{tensor}` to {file}, which does not hold it"),
                ));
            };
            location.insert(tensor.to_string(), i);
        }
        for shard in &shards {
            for t in shard.header.tensors() {
                match wanted.get(t.name.as_str()) {
                    Some(&f) if f == shard.file_name => {}
                    Some(&f) => {
                        return Err(Error::checkpoint(
                            path,
                            format!(
                                "{} holds `{}`, which the index maps to {f}",
                                shard.file_name, t.name
                            ),
                        ))
                    }
                    None => {
                        return Err(Error::checkpoint(
                            path,
                            format!(
                                "{} holds `{}`, which the index does not list",
                                shard.file_name, t.name
                            ),
                        ))
                    }
                }
            }
        }
        let index_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| INDEX_FILE.to_string());
        Ok(Self {
            given: Given::Index,
            path: path.to_path_buf(),
            folder,
            index: Some((index_name, index)),
            shards,
            location,
        })
    }

    /// How the checkpoint was named: a file, a folder, or an index.
    pub fn given(&self) -> Given {
        self.given
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder holding its files.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// The index's file name and JSON object, for a sharded checkpoint.
    pub fn index(&self) -> Option<(&str, &Map<String, Value>)> {
        self.index.as_ref().map(|(n, m)| (n.as_str(), m))
    }

    /// Its shards, in file-name order (one for a single file).
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The number of tensors.
    pub fn len(&self) -> usize {
        self.location.len()
    }

    /// Whether it holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.location.is_empty()
    }

    /// Whether it holds a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    /// The tensor called `name` and the shard that holds it.
    pub fn get(&self, name: &str) -> Option<(&Shard, &StoredTensor)> {
        let shard = self.shards.get(*self.location.get(name)?)?;
        Some((shard, shard.header.get(name)?))
    }

    /// Every tensor, shard by shard in file order.
    pub fn tensors(&self) -> impl Iterator<Item = (&Shard, &StoredTensor)> {
        self.shards
            .iter()
            .flat_map(|s| s.header.tensors().iter().map(move |t| (s, t)))
    }

    /// Reads the tensor called `name` (only its bytes) onto `device`, in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (shard, tensor) = self.get(name).ok_or_else(|| Error::MissingKey {
            key: name.to_string(),
            file: self.path.display().to_string(),
        })?;
        let bytes = shard.read_tensor_bytes(tensor)?;
        tensor_from_bytes(tensor.dtype, &tensor.shape, &bytes, device)
            .map_err(|e| Error::checkpoint(&shard.path, format!("tensor `{name}`: {e}")))
    }

    /// The folder's `config.json`, when there is one and it parses.
    pub fn config_json(&self) -> Option<Map<String, Value>> {
        let text = std::fs::read_to_string(self.folder.join("config.json")).ok()?;
        match serde_json::from_str(&text).ok()? {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }

    /// The folder's other top-level files, which a merged folder copies: configs, tokenizer
    /// files, README. The checkpoint's own shards and index (whatever their names), other
    /// weight files (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`, `*.gguf`, `*.index.json`),
    /// hidden files and sub-folders are left out. Empty for a checkpoint given as a single
    /// file.
    pub fn companion_files(&self) -> Result<Vec<PathBuf>> {
        if self.given == Given::File {
            return Ok(Vec::new());
        }
        companion_files(&self.folder, |name| {
            self.shards.iter().any(|s| s.file_name == name)
                || self.index.as_ref().is_some_and(|(index, _)| *index == name)
        })
    }
}

/// The top-level files of `folder` that go with its weights: configs, tokenizer files,
/// README (not weight files, the checkpoint's own files as `ours` names them, hidden files
/// or sub-folders).
pub(crate) fn companion_files(folder: &Path, ours: impl Fn(&str) -> bool) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(folder, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && !ours(&name) && !name.starts_with('.') && !is_weight_file(&name) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a file name is model weights (never copied beside a merged checkpoint).
fn is_weight_file(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".gguf",
        ".index.json",
        ".ckpt",
        ".h5",
        ".msgpack",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
}

/// The checkpoint file a folder holds: (path, whether it is an index).
fn find_in_folder(folder: &Path) -> Result<(PathBuf, bool)> {
    for (name, is_index) in [(INDEX_FILE, true), (SINGLE_FILE, false)] {
        if folder.join(name).is_file() {
            return Ok((folder.join(name), is_index));
        }
    }
    if folder.join("adapter_config.json").is_file() {
        return Err(Error::checkpoint(
            folder,
            "is a PEFT adapter folder (it has adapter_config.json), not a model checkpoint",
        ));
    }
    let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let indexes: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors.index.json"))
        .collect();
    let files: Vec<&String> = names
        .iter()
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    match (indexes.as_slice(), files.as_slice()) {
        ([index], _) => Ok((folder.join(index), true)),
        ([], [file]) => Ok((folder.join(file), false)),
        ([], []) => {
            let torch = names
                .iter()
                .any(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"));
            let hint = if torch {
                "; it holds PyTorch pickle weights only: convert them with `lorakit convert` first"
            } else {
                ""
            };
            Err(Error::checkpoint(
                folder,
                format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder{hint}"),
            ))
        }
        _ => Err(Error::checkpoint(
            folder,
            format!(
                "several candidate checkpoints and no {SINGLE_FILE} or {INDEX_FILE}; name the \
                 file: {}",
                indexes
                    .iter()
                    .chain(files.iter())
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// Refuses an index that lists fewer shards than their names announce
/// (`model-00004-of-00004.safetensors` never referenced: its tensors would be dropped).
fn check_shard_count(files: &[&str], index: &Path) -> Result<()> {
    // `prefix-00001-of-00004.safetensors` → ("prefix", 4, width 5).
    let announced = |f: &str| -> Option<(String, usize, usize)> {
        let stem = f.strip_suffix(".safetensors")?;
        let (head, total) = stem.rsplit_once("-of-")?;
        let (prefix, number) = head.rsplit_once('-')?;
        number.parse::<usize>().ok()?;
        Some((prefix.to_string(), total.parse().ok()?, number.len()))
    };
    let Some(series) = files.first().and_then(|f| announced(f)) else {
        return Ok(());
    };
    let (prefix, total, width) = series.clone();
    let same_series = files.iter().all(|f| announced(f) == Some(series.clone()));
    if !same_series || files.len() >= total {
        return Ok(());
    }
    // The first few numbers never referenced (files.len() + 3 steps at most, however
    // many shards a name announces).
    let listed: BTreeSet<usize> = files
        .iter()
        .filter_map(|f| {
            f.strip_prefix(prefix.as_str())?
                .get(1..=width)?
                .parse()
                .ok()
        })
        .collect();
    let missing: Vec<String> = (1..=total)
        .filter(|i| !listed.contains(i))
        .take(3)
        .map(|i| format!("{prefix}-{i:0width$}-of-{total:0width$}.safetensors"))
        .collect();
    let more = if total - files.len() > missing.len() {
        ", …"
    } else {
        ""
    };
    Err(Error::checkpoint(
        index,
        format!(
            "the index lists {} of the {total} shards its file names announce; never \
             referenced: {}{more}",
            files.len(),
            missing.join(", ")
        ),
    ))
}

/// Refuses a shard name that would leave the index's folder (`../x`, `/abs`, `a/b`).
fn check_plain_file_name(file: &str, index: &Path) -> Result<()> {
    let plain = !file.is_empty()
        && !file.contains(['/', '\\'])
        && file != "."
        && file != ".."
        && Path::new(file).file_name().is_some_and(|n| n == file);
    if plain {
        Ok(())
    } else {
        Err(Error::checkpoint(
            index,
            format!("shard name `{file}` is not a plain file name in the index's folder"),
        ))
    }
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
