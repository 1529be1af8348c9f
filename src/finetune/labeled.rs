//! Labeled examples for sequence classification: token ids (with token types) and a label,
//! read from JSONL, and their padded batches.
//!
//! A JSONL file holds one JSON object per line (other keys are ignored; blank lines are
//! skipped):
//!
//! | key | meaning |
//! |---|---|
//! | `text`: str (and `text_pair`: str) | tokenized with the tokenizer's special tokens (BERT's `[CLS] text [SEP] pair [SEP]`), cut to `max_len` as transformers' `truncation=True` cuts |
//! | or `input_ids`: [u32] (and `token_type_ids`: [u32]) | as given (token types 0 if absent) |
//! | `label`: an integer | a class index (single-label classification) |
//! | `label`: a number with a fraction, or a list of numbers | the target values (regression, or multi-label 0/1 targets) |
//! | `label`: a string | a class by name, looked up in the model config's `id2label` |
//!
//! `labels` is accepted for `label`, as in the datasets transformers' examples read.
//! Every problem in a line is an error that names the file and the line.
//!
//! ```
//! use candle_core::Device;
//! use lorakit::finetune::labeled::{Label, LabeledDataset};
//! use lorakit::tokenizer::TextTokenizer;
//! # fn main() -> lorakit::Result<()> {
//! let tok = TextTokenizer::from_dir("tests/fixtures/finetune/classify/tokenizer")?;
//! let data = LabeledDataset::from_jsonl("tests/fixtures/finetune/classify/train.jsonl", &tok, 16)?;
//! assert!(matches!(data.examples()[0].label, Label::Class(_)));
//! assert!(data.examples().iter().all(|e| e.ids.len() <= 16));
//! # Ok(()) }
//! ```

use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use super::batching::{BatchOptions, Packing};
use super::data::{shuffled_order, split_indices};
use super::jsonl::{dataset_error, id_list, kind, string_field, Sourced};
use crate::error::{Error, Result};
use crate::models::bert::ProblemType;
use crate::tokenizer::TextTokenizer;

/// What an example should be classified as.
#[derive(Clone, Debug, PartialEq)]
pub enum Label {
    /// A class index (single-label classification; for a one-output regression model, the
    /// target value).
    Class(u32),
    /// Target values: one per output (regression; multi-label classification with 0/1
    /// targets), or one for a one-output regression model.
    Values(Vec<f32>),
    /// A class by name: its position in the model config's `id2label`
    /// ([`LabelSpace::names`]).
    Name(String),
}

/// The labels a model takes: its problem type, its number of outputs and, when its config
/// names them (`id2label`), the classes' names in index order.
///
/// ```
/// use lorakit::finetune::labeled::LabelSpace;
/// use lorakit::models::bert::ProblemType;
/// let space = LabelSpace::new(ProblemType::SingleLabelClassification, 2)
///     .with_names(vec!["negative".into(), "positive".into()]);
/// assert_eq!(space.class_of("positive"), Some(1));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSpace {
    /// How the labels are scored.
    pub problem: ProblemType,
    /// The number of outputs.
    pub num_labels: usize,
    /// The classes' names, index order (empty: none; otherwise `num_labels` of them).
    pub names: Vec<String>,
}

impl LabelSpace {
    /// A space without class names.
    pub fn new(problem: ProblemType, num_labels: usize) -> Self {
        Self {
            problem,
            num_labels,
            names: Vec::new(),
        }
    }

    /// The same space with class names (index order).
    pub fn with_names(mut self, names: Vec<String>) -> Self {
        self.names = names;
        self
    }

    /// The index of the class named `name`.
    pub fn class_of(&self, name: &str) -> Option<u32> {
        let i = self.names.iter().position(|n| n == name)?;
        u32::try_from(i).ok()
    }
}

/// One example: token ids, their token types and the label.
///
/// ```
/// use lorakit::finetune::labeled::{Label, LabeledExample};
/// # fn main() -> lorakit::Result<()> {
/// let ex = LabeledExample::new(vec![2, 14, 25, 3], vec![0; 4], Label::Class(1))?;
/// assert_eq!(ex.ids.len(), 4);
/// assert!(LabeledExample::new(vec![2, 14], vec![0], Label::Class(0)).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LabeledExample {
    /// The token ids.
    pub ids: Vec<u32>,
    /// One token type per id (BERT's segment: 0 for the first text, 1 for a pair's second).
    pub type_ids: Vec<u32>,
    /// The label.
    pub label: Label,
}

impl LabeledExample {
    /// An example from its parts.
    ///
    /// Errors: no ids, not one token type per id, or no target value.
    pub fn new(ids: Vec<u32>, type_ids: Vec<u32>, label: Label) -> Result<Self> {
        Self::build(ids, type_ids, label).map_err(dataset_error)
    }

    fn build(ids: Vec<u32>, type_ids: Vec<u32>, label: Label) -> std::result::Result<Self, String> {
        if ids.is_empty() {
            return Err("the example has no tokens".into());
        }
        if ids.len() != type_ids.len() {
            return Err(format!(
                "{} token ids but {} token types (one per token wanted)",
                ids.len(),
                type_ids.len()
            ));
        }
        if matches!(&label, Label::Values(v) if v.is_empty()) {
            return Err("the label has no value".into());
        }
        if let Label::Values(v) = &label {
            if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                return Err(format!("the label holds {x}, not a finite number"));
            }
        }
        Ok(Self {
            ids,
            type_ids,
            label,
        })
    }
}

/// A list of [`LabeledExample`]s, remembering the file line each was read from (for
/// errors).
#[derive(Clone, Debug, Default)]
pub struct LabeledDataset {
    examples: Sourced<LabeledExample>,
}

/// One batch: the rows padded on the right to the longest, an attention mask, token types
/// and the labels.
#[derive(Clone, Debug)]
pub struct LabeledBatch {
    /// `(rows, t)` u32 token ids, padding with `pad_id`.
    pub input_ids: Tensor,
    /// `(rows, t)` u32 token types, 0 in padding.
    pub token_type_ids: Tensor,
    /// `(rows, t)` u32: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// u32 `(rows,)` class indices (single-label classification) or f32 `(rows, k)`
    /// target values.
    pub labels: Tensor,
}

impl LabeledBatch {
    /// The number of examples (rows).
    pub fn rows(&self) -> usize {
        self.input_ids.dim(0).unwrap_or(0)
    }
}

impl LabeledDataset {
    /// Reads a JSONL file (the forms are in the [module docs](self)), tokenizing texts
    /// with `tokenizer` cut to at most `max_len` tokens (use the training `seq_len`).
    ///
    /// Errors, each naming the file and, for a line's problem, the 1-based line: a missing
    /// or unreadable file, a file with no example, a line that is not a JSON object, a
    /// line with neither or both of `text` and `input_ids`, no `label`, a label that is not
    /// a number or a list of numbers, an `input_ids` longer than `max_len`.
    ///
    /// ```
    /// use lorakit::finetune::labeled::LabeledDataset;
    /// use lorakit::tokenizer::TextTokenizer;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let tok = TextTokenizer::from_dir("tests/fixtures/finetune/classify/tokenizer")?;
    /// let dir = std::env::temp_dir().join(format!("lorakit-labeled-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// let file = dir.join("bad.jsonl");
    /// std::fs::write(&file, "{\"text\": \"a good film\", \"label\": 1}\n{\"text\": \"dull\"}\n")?;
    /// let err = LabeledDataset::from_jsonl(&file, &tok, 16).unwrap_err().to_string();
    /// assert!(err.contains("bad.jsonl: line 2: no `label`"), "{err}");
    /// std::fs::remove_dir_all(&dir)?;
    /// # Ok(()) }
    /// ```
    pub fn from_jsonl(
        path: impl AsRef<Path>,
        tokenizer: &TextTokenizer,
        max_len: usize,
    ) -> Result<Self> {
        // One truncating copy of the tokenizer for the whole file.
        let tokenizer = tokenizer.truncated_to(max_len)?;
        let examples = Sourced::read(path.as_ref(), |map| parse_line(map, &tokenizer, max_len))?;
        Ok(Self { examples })
    }

    /// A dataset of examples built in code.
    pub fn from_examples(examples: Vec<LabeledExample>) -> Self {
        Self {
            examples: Sourced::built(examples),
        }
    }

    /// The examples, in order.
    pub fn examples(&self) -> &[LabeledExample] {
        &self.examples.items
    }

    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.items.len()
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.examples.items.is_empty()
    }

    /// The examples at `indices`, in that order. Errors: an index out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        Ok(Self {
            examples: self.examples.subset(indices)?,
        })
    }

    /// Shuffles the examples with `seed` and splits off `eval_count` of them: `(train,
    /// eval)`, as [`super::data::Dataset::split_eval`] does.
    ///
    /// Errors: `eval_count >= len()`.
    pub fn split_eval(&self, eval_count: usize, seed: u64) -> Result<(Self, Self)> {
        let (train, eval) = split_indices(self.len(), eval_count, seed)?;
        Ok((self.subset(&train)?, self.subset(&eval)?))
    }

    /// Errors unless every example fits a model with `vocab_size` tokens, `type_vocab_size`
    /// token types and `seq_len` positions per row (rows are not cut: a cut would drop
    /// the closing special token; tokenize with `max_len` = `seq_len`), and has a label
    /// `space` takes ([`LabeledDataset::batches`]).
    pub fn check(
        &self,
        vocab_size: usize,
        type_vocab_size: usize,
        seq_len: usize,
        space: &LabelSpace,
    ) -> Result<()> {
        let list = &self.examples;
        list.check_ids_below(|e| &e.ids, vocab_size, "vocabulary", "tokens")?;
        list.check_ids_below(|e| &e.type_ids, type_vocab_size, "token types", "types")?;
        for (i, example) in list.items.iter().enumerate() {
            if example.ids.len() > seq_len {
                let what = format!(
                    "{} tokens, more than seq_len {seq_len}: read the file with max_len = \
                     seq_len, which cuts texts as transformers' truncation does",
                    example.ids.len()
                );
                return Err(list.error_at(i, what));
            }
            label_values(&example.label, space).map_err(|what| list.error_at(i, what))?;
        }
        Ok(())
    }

    /// One epoch's batches: the examples in an order shuffled by `(seed, epoch)` (the same
    /// as [`super::data::Dataset::batches`]' for as many examples), `batch_size` rows per
    /// batch (the last may have fewer), each padded on the right with `pad_id` to its
    /// longest row. Labels are u32 class indices for single-label classification and
    /// f32 `(rows, num_labels)` values otherwise (`(rows, 1)` for one output).
    ///
    /// Errors: `batch_size` 0, [`Packing::Pack`] (each example is one row), an empty
    /// dataset, or an example whose label `space` does not take.
    ///
    /// ```
    /// use candle_core::Device;
    /// use lorakit::finetune::batching::{BatchOptions, Packing};
    /// use lorakit::finetune::labeled::{Label, LabelSpace, LabeledDataset, LabeledExample};
    /// use lorakit::models::bert::ProblemType;
    /// # fn main() -> lorakit::Result<()> {
    /// let data = LabeledDataset::from_examples(vec![
    ///     LabeledExample::new(vec![2, 7, 3], vec![0; 3], Label::Class(1))?,
    ///     LabeledExample::new(vec![2, 8, 9, 3], vec![0; 4], Label::Name("no".into()))?,
    /// ]);
    /// let options = BatchOptions { batch_size: 2, seq_len: 8, packing: Packing::Pad, pad_id: 0 };
    /// let space = LabelSpace::new(ProblemType::SingleLabelClassification, 2)
    ///     .with_names(vec!["no".into(), "yes".into()]);
    /// let batch = &data.batches(&options, 0, 0, &space, &Device::Cpu)?[0];
    /// assert_eq!(batch.input_ids.dims(), [2, 4]);
    /// let mask = batch.attention_mask.to_vec2::<u32>()?;
    /// assert_eq!(mask.iter().map(|r| r.iter().sum::<u32>()).sum::<u32>(), 7);
    /// # Ok(()) }
    /// ```
    pub fn batches(
        &self,
        options: &BatchOptions,
        epoch: usize,
        seed: u64,
        space: &LabelSpace,
        device: &Device,
    ) -> Result<Vec<LabeledBatch>> {
        check_options(options)?;
        if self.is_empty() {
            return Err(dataset_error("no examples to batch".into()));
        }
        let order = shuffled_order(self.len(), seed, epoch as u64);
        order
            .chunks(options.batch_size)
            .map(|rows| {
                let rows: Vec<(usize, &LabeledExample)> = rows
                    .iter()
                    .filter_map(|&i| self.examples.items.get(i).map(|e| (i, e)))
                    .collect();
                self.batch_of(&rows, options.pad_id, space, device)
            })
            .collect()
    }

    fn batch_of(
        &self,
        rows: &[(usize, &LabeledExample)],
        pad_id: u32,
        space: &LabelSpace,
        device: &Device,
    ) -> Result<LabeledBatch> {
        let width = rows.iter().map(|(_, e)| e.ids.len()).max().unwrap_or(0);
        let cells = rows.len() * width;
        let (mut ids, mut types, mut mask) = (
            Vec::with_capacity(cells),
            Vec::with_capacity(cells),
            Vec::with_capacity(cells),
        );
        for (_, example) in rows {
            let pad = width - example.ids.len();
            ids.extend(
                example
                    .ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, pad)),
            );
            types.extend(
                example
                    .type_ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, pad)),
            );
            mask.extend(std::iter::repeat_n(1u32, example.ids.len()));
            mask.extend(std::iter::repeat_n(0u32, pad));
        }
        let labels = rows
            .iter()
            .map(|&(i, e)| {
                label_values(&e.label, space).map_err(|what| self.examples.error_at(i, what))
            })
            .collect::<Result<Vec<_>>>()?;
        let labels = match space.problem {
            ProblemType::SingleLabelClassification => {
                let classes: Vec<u32> = labels
                    .iter()
                    .map(|v| v.first().copied().unwrap_or(0.0) as u32)
                    .collect();
                Tensor::from_vec(classes, rows.len(), device)?
            }
            _ => {
                let k = labels.first().map_or(0, Vec::len);
                Tensor::from_vec(labels.concat(), (rows.len(), k), device)?
            }
        };
        let shape = (rows.len(), width);
        Ok(LabeledBatch {
            input_ids: Tensor::from_vec(ids, shape, device)?,
            token_type_ids: Tensor::from_vec(types, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?,
            labels,
        })
    }
}

/// Errors unless `options` can batch labeled examples: a `batch_size` of 0, or
/// [`Packing::Pack`] (each example is one row).
pub(crate) fn check_options(options: &BatchOptions) -> Result<()> {
    let fail = |field, reason: &str| Err(Error::settings("batch options", field, reason));
    if options.batch_size == 0 {
        return fail("batch_size", "must be at least 1, got 0");
    }
    if options.packing == Packing::Pack {
        return fail(
            "packing",
            "Pack joins examples into rows, but a classifier reads one example per row: use \
             Packing::Pad",
        );
    }
    Ok(())
}

/// The problem type transformers' classifiers use for these labels when the config names
/// none: regression for one output, single-label classification for class indices,
/// multi-label otherwise.
///
/// Errors: with more than one output, labels that mix class indices and values (naming the
/// first example that differs from the first).
pub(crate) fn inferred_problem(data: &LabeledDataset, num_labels: usize) -> Result<ProblemType> {
    let is_class = |e: &LabeledExample| matches!(e.label, Label::Class(_) | Label::Name(_));
    let Some(first) = data.examples().first() else {
        return Ok(ProblemType::SingleLabelClassification);
    };
    if num_labels == 1 {
        return Ok(ProblemType::Regression);
    }
    let mixed = data
        .examples()
        .iter()
        .enumerate()
        .find(|(_, e)| is_class(e) != is_class(first));
    if let Some((i, example)) = mixed {
        let what = format!(
            "label {:?}, but example 0's is {:?}: give every example a class index \
             (single-label classification) or every one {num_labels} values (multi-label)",
            example.label, first.label
        );
        return Err(data.examples.error_at(i, what));
    }
    Ok(match is_class(first) {
        true => ProblemType::SingleLabelClassification,
        false => ProblemType::MultiLabelClassification,
    })
}

/// `label` as `space` takes it: one class index (as f32) for single-label classification,
/// else `num_labels` values. Errors say what was expected.
fn label_values(label: &Label, space: &LabelSpace) -> std::result::Result<Vec<f32>, String> {
    let n = space.num_labels;
    let class = match label {
        Label::Name(name) => Some(space.class_of(name).ok_or_else(
            || match space.names.is_empty() {
                true => format!(
                    "label {name:?} is a name, but the model's config names none of its {n} \
                 classes (id2label): give the class index, or set the names"
                ),
                false => format!(
                    "label {name:?} is none of the model's classes ({})",
                    space.names.join(", ")
                ),
            },
        )?),
        Label::Class(c) => Some(*c),
        Label::Values(_) => None,
    };
    match (space.problem, class, label) {
        (ProblemType::SingleLabelClassification, Some(c), _) => {
            if (c as usize) < n {
                Ok(vec![c as f32])
            } else {
                Err(format!(
                    "label {c} is not a class of the model's {n} (0..{n})"
                ))
            }
        }
        (ProblemType::SingleLabelClassification, None, _) => Err(format!(
            "label {label:?} is values, but the model classifies into one of {n} classes: \
             give the class index"
        )),
        (ProblemType::Regression, _, Label::Class(c)) if n == 1 => Ok(vec![*c as f32]),
        (_, _, Label::Values(v)) if v.len() == n => Ok(v.clone()),
        (problem, _, label) => Err(format!(
            "label {label:?} does not fit the model's {} with {n} output(s): give {n} value(s)",
            problem.as_str()
        )),
    }
}

/// One JSONL line's example.
fn parse_line(
    map: &Map<String, Value>,
    tokenizer: &TextTokenizer,
    max_len: usize,
) -> std::result::Result<LabeledExample, String> {
    let (ids, type_ids) = match (map.contains_key("text"), map.contains_key("input_ids")) {
        (true, true) => return Err("`text` and `input_ids` in one line: give one".into()),
        (false, false) => {
            return Err("no `text` or `input_ids` key (other keys are ignored)".into())
        }
        (true, false) => {
            let pair = match map.get("text_pair") {
                None | Some(Value::Null) => None,
                Some(_) => Some(string_field(map, "text_pair")?),
            };
            tokenizer
                .encode_with_types(string_field(map, "text")?, pair)
                .map_err(|e| format!("tokenizing failed: {e}"))?
        }
        (false, true) => {
            let ids = id_list(map, "input_ids")?;
            if ids.len() > max_len {
                return Err(format!(
                    "`input_ids` holds {} tokens, more than max_len {max_len}",
                    ids.len()
                ));
            }
            let types = match map.get("token_type_ids") {
                None | Some(Value::Null) => vec![0; ids.len()],
                Some(_) => id_list(map, "token_type_ids")?,
            };
            (ids, types)
        }
    };
    let key = match (map.contains_key("label"), map.contains_key("labels")) {
        (true, true) => return Err("both `label` and `labels`: give one".into()),
        (true, false) => "label",
        (false, true) => "labels",
        (false, false) => return Err("no `label` (or `labels`) key".into()),
    };
    LabeledExample::build(ids, type_ids, parse_label(&map[key], key)?)
}

/// An integer is a class; another number or a list of numbers are values.
fn parse_label(value: &Value, key: &str) -> std::result::Result<Label, String> {
    let number = |v: &Value| v.as_f64().map(|x| x as f32);
    match value {
        Value::Number(n) if n.is_u64() || n.is_i64() => match n.as_u64().map(u32::try_from) {
            Some(Ok(class)) => Ok(Label::Class(class)),
            Some(Err(_)) => Err(format!("`{key}` {n} is too large for a class index")),
            None => Err(format!(
                "`{key}` {n} is a negative integer, not a class index"
            )),
        },
        Value::Number(_) => Ok(Label::Values(vec![number(value).unwrap_or(f32::NAN)])),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                number(v).ok_or_else(|| format!("`{key}`[{i}] must be a number, got {}", kind(v)))
            })
            .collect::<std::result::Result<Vec<f32>, String>>()
            .map(Label::Values),
        Value::String(s) => Ok(Label::Name(s.clone())),
        other => Err(format!(
            "`{key}` must be a class index, a number or a list of numbers, got {}",
            kind(other)
        )),
    }
}
