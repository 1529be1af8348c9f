//! Reading JSONL training files — one JSON object per line, each line's problems reported
//! with the file and the 1-based line — into lists of examples that remember their lines
//! ([`Sourced`]; [`crate::finetune::data`] and [`crate::finetune::labeled`] parse the
//! objects).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::{Error, Result, Scope};

/// Where an example was read: a file and its 1-based line.
#[derive(Clone, Debug)]
pub(crate) struct Source {
    pub file: Arc<PathBuf>,
    pub line: usize,
}

impl Source {
    /// An error about this line.
    pub fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error::usage(
            Scope::File(self.file.as_ref().clone()),
            format!("line {}: {reason}", self.line),
        )
    }
}

/// Examples and, for each, the file line it was read from (`None`: built in code), for
/// errors that name the line.
#[derive(Clone, Debug)]
pub(crate) struct Sourced<E> {
    pub items: Vec<E>,
    pub sources: Vec<Option<Source>>,
}

impl<E> Default for Sourced<E> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            sources: Vec::new(),
        }
    }
}

impl<E: Clone> Sourced<E> {
    /// Examples built in code.
    pub fn built(items: Vec<E>) -> Self {
        let sources = vec![None; items.len()];
        Self { items, sources }
    }

    /// Every line of the JSONL file at `path` through `parse` (errors: [`read_jsonl`]'s,
    /// and `parse`'s, named by line).
    pub fn read(
        path: &Path,
        mut parse: impl FnMut(&Map<String, Value>) -> std::result::Result<E, String>,
    ) -> Result<Self> {
        let mut out = Self::default();
        for (map, source) in read_jsonl(path)? {
            out.items.push(parse(&map).map_err(|p| source.error(p))?);
            out.sources.push(Some(source));
        }
        Ok(out)
    }

    /// The examples at `indices`, in that order. Errors: an index out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let mut out = Self::default();
        for &i in indices {
            let (Some(item), Some(source)) = (self.items.get(i), self.sources.get(i)) else {
                return Err(dataset_error(format!(
                    "subset index {i} is out of range for {} examples",
                    self.items.len()
                )));
            };
            out.items.push(item.clone());
            out.sources.push(source.clone());
        }
        Ok(out)
    }

    /// The line example `i` was read from.
    pub fn source(&self, i: usize) -> Option<&Source> {
        self.sources.get(i).and_then(Option::as_ref)
    }

    /// An error about example `i`: its file line if it has one (its index in this list
    /// may be a subset's), else the index.
    pub fn error_at(&self, i: usize, what: String) -> Error {
        match self.source(i) {
            Some(s) => s.error(what),
            None => dataset_error(format!("example {i}, {what}")),
        }
    }

    /// Errors at the first id in `ids(example)` that is not below `limit`, the size of the
    /// model's `table` (of `unit`s).
    pub fn check_ids_below(
        &self,
        ids: impl Fn(&E) -> &[u32],
        limit: usize,
        table: &str,
        unit: &str,
    ) -> Result<()> {
        for (i, item) in self.items.iter().enumerate() {
            let bad = ids(item)
                .iter()
                .enumerate()
                .find(|&(_, &id)| usize::try_from(id).map_or(true, |id| id >= limit));
            let Some((position, id)) = bad else { continue };
            return Err(self.error_at(
                i,
                format!(
                    "token {position}: id {id} is outside the {table} of {limit} {unit} (was \
                     the data tokenized for another model?)"
                ),
            ));
        }
        Ok(())
    }
}

/// An error about the dataset as a whole.
pub(crate) fn dataset_error(reason: String) -> Error {
    Error::usage(Scope::Settings("dataset".into()), reason)
}

/// Every non-blank line of the JSONL file at `path` as a JSON object, with its line.
///
/// Errors, naming the file (and the line): a missing or unreadable file, a file with no
/// object, a line that is not UTF-8, not JSON or not an object.
pub(crate) fn read_jsonl(path: &Path) -> Result<Vec<(Map<String, Value>, Source)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = Arc::new(path.to_path_buf());
    let mut out = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let source = Source {
            file: Arc::clone(&file),
            line: index + 1,
        };
        let line =
            std::str::from_utf8(raw).map_err(|e| source.error(format!("not UTF-8 text ({e})")))?;
        let line = line.strip_prefix('\u{feff}').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| json_error(&e, &source))?;
        let Value::Object(map) = value else {
            return Err(source.error(format!("expected a JSON object, got {}", kind(&value))));
        };
        out.push((map, source));
    }
    if out.is_empty() {
        return Err(Error::usage(
            Scope::File(path.to_path_buf()),
            "no examples: the file is empty (JSONL wants one JSON object per line)",
        ));
    }
    Ok(out)
}

/// serde_json counts lines from the text it was given; the message names the file's line.
fn json_error(e: &serde_json::Error, source: &Source) -> Error {
    let message = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    Error::Json {
        path: source.file.as_ref().clone(),
        line: source.line,
        column: e.column(),
        message: message
            .strip_suffix(&position)
            .unwrap_or(&message)
            .to_string(),
    }
}

/// The string at `key`.
pub(crate) fn string_field<'a>(
    map: &'a Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("`{key}` must be a string, got {}", kind(other))),
        None => Err(format!("`{key}` is missing")),
    }
}

/// The array at `key`.
pub(crate) fn array_field<'a>(
    map: &'a Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a [Value], String> {
    match map.get(key) {
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(format!("`{key}` must be an array, got {}", kind(other))),
        None => Err(format!("`{key}` is missing")),
    }
}

/// `key`'s array as ids (token ids, token types).
pub(crate) fn id_list(
    map: &Map<String, Value>,
    key: &str,
) -> std::result::Result<Vec<u32>, String> {
    array_field(map, key)?
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| format!("`{key}`[{i}] is not an id (an integer in 0..2^32): {v}"))
        })
        .collect()
}

/// A JSON value's kind, for messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
