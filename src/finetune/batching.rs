//! Batches of token ids and loss masks from a [`super::data::Dataset`].
//!
//! Each epoch visits the examples in an order shuffled by `(seed, epoch)`; a batch is
//! `(batch, t)` token ids and a `(batch, t)` loss mask, 1.0 where the token is a
//! prediction target. The causal-LM loss of a batch is
//! `Σ_{b, t ≥ 1} mask[b, t] · CE(logits[b, t - 1], ids[b, t]) / target_tokens`.
//!
//! ```
//! use candle_core::Device;
//! use lorakit::finetune::batching::{BatchOptions, Packing};
//! use lorakit::finetune::data::Dataset;
//! use lorakit::tokenizer::TextTokenizer;
//! # fn main() -> lorakit::Result<()> {
//! let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?;
//! let data = Dataset::from_jsonl("tests/fixtures/finetune_data/mixed.jsonl", &tok)?;
//! let options = BatchOptions { batch_size: 2, seq_len: 16, packing: Packing::Pad, pad_id: 2 };
//! let steps = data.batch_count(&options)?;
//! for epoch in 0..2 {
//!     let batches = data.batches(&options, epoch, 7, &Device::Cpu)?;
//!     assert_eq!(batches.len(), steps);
//! }
//! # Ok(()) }
//! ```

use candle_core::{Device, Tensor};

use super::data::{shuffled_order, Dataset, Example};
use crate::error::{Error, Result, Scope};

/// How examples become rows of a batch.
///
/// ```
/// use lorakit::finetune::batching::Packing;
/// assert_ne!(Packing::Pad, Packing::Pack);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    /// One example per row, cut to `seq_len` on the right; a batch is padded on the
    /// right to its longest row.
    Pad,
    /// The epoch's examples concatenated and cut into rows of exactly `seq_len` tokens
    /// (Hugging Face's `group_texts`; attention crosses example boundaries). The
    /// incomplete last row is dropped, unless it is the only row; then it is padded.
    Pack,
}

/// How [`Dataset::batches`] builds batches.
///
/// ```
/// use lorakit::finetune::batching::{BatchOptions, Packing};
/// let options = BatchOptions { batch_size: 8, seq_len: 512, packing: Packing::Pack, pad_id: 0 };
/// assert_eq!(options.seq_len, 512);
/// ```
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Rows per batch (at least 1).
    pub batch_size: usize,
    /// The longest row (at least 2: one token to predict from, one to predict).
    pub seq_len: usize,
    /// One example per row, or examples packed into rows.
    pub packing: Packing,
    /// The id written in padding (its mask is 0, so any id in the vocabulary will do).
    pub pad_id: u32,
}

impl BatchOptions {
    fn check(&self) -> Result<()> {
        let fail = |field, reason: &str| Error::settings("batch options", field, reason);
        if self.batch_size == 0 {
            return Err(fail("batch_size", "must be at least 1, got 0"));
        }
        if self.seq_len < 2 {
            return Err(fail(
                "seq_len",
                "must be at least 2 (a token to predict from and one to predict)",
            ));
        }
        Ok(())
    }
}

/// One batch: token ids, the loss mask and the number of targets.
///
/// ```
/// use candle_core::Device;
/// use lorakit::finetune::batching::{BatchOptions, Packing};
/// use lorakit::finetune::data::{Dataset, Example};
/// # fn main() -> lorakit::Result<()> {
/// let data = Dataset::from_examples(vec![Example::new(vec![1, 5, 6], vec![false, true, true])?]);
/// let options = BatchOptions { batch_size: 1, seq_len: 8, packing: Packing::Pad, pad_id: 0 };
/// let batch = &data.batches(&options, 0, 0, &Device::Cpu)?[0];
/// assert_eq!(batch.input_ids.to_vec2::<u32>()?, [[1, 5, 6]]);
/// assert_eq!(batch.loss_mask.to_vec2::<f32>()?, [[0.0, 1.0, 1.0]]);
/// assert_eq!(batch.target_tokens, 2);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Batch {
    /// `(batch, t)` u32 token ids.
    pub input_ids: Tensor,
    /// `(batch, t)` f32: 1.0 where the token is a prediction target (trained, not
    /// padding, not at position 0), else 0.0.
    pub loss_mask: Tensor,
    /// The number of ones in `loss_mask` (all at `t >= 1`).
    pub target_tokens: usize,
}

/// One row: each token and whether it is trained.
type Row = Vec<(u32, bool)>;

impl Dataset {
    /// One epoch's batches: the examples in an order shuffled by `(seed, epoch)` (the same
    /// inputs give the same batches; different epochs give different orders; the order
    /// depends on nothing else but the number of examples, so Pad and Pack visit the
    /// examples in the same order), made into rows as `options.packing` says,
    /// `options.batch_size` rows per batch.
    ///
    /// [`Packing::Pad`]: each example cut to `seq_len`, each batch padded with `pad_id`
    /// on the right to its longest row (not to `seq_len`); the last batch may have fewer
    /// rows. [`Packing::Pack`]: every row is `seq_len` tokens; the last batch may have
    /// fewer rows.
    ///
    /// Errors: `batch_size` 0, `seq_len` below 2, an empty dataset.
    ///
    /// ```
    /// use candle_core::Device;
    /// use lorakit::finetune::batching::{BatchOptions, Packing};
    /// use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(vec![
    ///     Example::new(vec![1, 5, 6, 2], vec![true; 4])?,
    ///     Example::new(vec![1, 7, 2], vec![true; 3])?,
    /// ]);
    /// let options = BatchOptions { batch_size: 4, seq_len: 3, packing: Packing::Pack, pad_id: 0 };
    /// let batches = data.batches(&options, 0, 0, &Device::Cpu)?;
    /// assert_eq!(batches[0].input_ids.dims(), [2, 3]); // 7 tokens: 2 rows of 3, 1 dropped
    /// # Ok(()) }
    /// ```
    pub fn batches(
        &self,
        options: &BatchOptions,
        epoch: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Vec<Batch>> {
        self.check_batchable(options)?;
        let order = shuffled_order(self.len(), seed, epoch as u64);
        let examples = order.iter().filter_map(|&i| self.examples().get(i));
        let rows = match options.packing {
            Packing::Pad => examples
                .map(|e| row_of(e).take(options.seq_len).collect())
                .collect(),
            Packing::Pack => pack(examples, options.seq_len),
        };
        rows.chunks(options.batch_size)
            .map(|chunk| {
                let width = chunk.iter().map(Vec::len).max().unwrap_or(0);
                let width = match options.packing {
                    Packing::Pad => width,
                    Packing::Pack => options.seq_len,
                };
                batch_of(chunk, width, options.pad_id, device)
            })
            .collect()
    }

    /// How many batches [`batches`](Self::batches) gives for `options` (the same for
    /// every epoch and seed), without building them.
    ///
    /// Errors: those of [`batches`](Self::batches).
    ///
    /// ```
    /// use lorakit::finetune::batching::{BatchOptions, Packing};
    /// use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(vec![Example::new(vec![1, 5, 2], vec![true; 3])?; 5]);
    /// let mut options = BatchOptions { batch_size: 2, seq_len: 4, packing: Packing::Pad, pad_id: 0 };
    /// assert_eq!(data.batch_count(&options)?, 3); // 5 rows
    /// options.packing = Packing::Pack;
    /// assert_eq!(data.batch_count(&options)?, 2); // 15 tokens: 3 rows of 4
    /// # Ok(()) }
    /// ```
    pub fn batch_count(&self, options: &BatchOptions) -> Result<usize> {
        self.check_batchable(options)?;
        let rows = match options.packing {
            Packing::Pad => self.len(),
            Packing::Pack => (self.total_tokens() / options.seq_len).max(1),
        };
        Ok(rows.div_ceil(options.batch_size))
    }

    /// How many examples keep no target token in their row: under [`Packing::Pad`], those
    /// whose trained tokens all lie at or past `seq_len` (a prompt longer than `seq_len`
    /// cuts its whole completion off), which then teach nothing; 0 under
    /// [`Packing::Pack`], which keeps every token.
    ///
    /// ```
    /// use lorakit::finetune::batching::{BatchOptions, Packing};
    /// use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let prompt_then_answer = |prompt: usize| {
    ///     let trained = (0..prompt + 2).map(|i| i >= prompt).collect();
    ///     Example::new(vec![7; prompt + 2], trained)
    /// };
    /// let data = Dataset::from_examples(vec![prompt_then_answer(3)?, prompt_then_answer(9)?]);
    /// let options = BatchOptions { batch_size: 2, seq_len: 8, packing: Packing::Pad, pad_id: 0 };
    /// assert_eq!(data.examples_without_targets(&options), 1);
    /// # Ok(()) }
    /// ```
    pub fn examples_without_targets(&self, options: &BatchOptions) -> usize {
        match options.packing {
            Packing::Pack => 0,
            Packing::Pad => self
                .examples()
                .iter()
                .filter(|e| !e.trained.iter().take(options.seq_len).skip(1).any(|&t| t))
                .count(),
        }
    }

    fn check_batchable(&self, options: &BatchOptions) -> Result<()> {
        options.check()?;
        if self.is_empty() {
            return Err(Error::usage(
                Scope::Settings("dataset".into()),
                "no examples to batch",
            ));
        }
        Ok(())
    }
}

fn row_of(example: &Example) -> impl Iterator<Item = (u32, bool)> + '_ {
    example
        .ids
        .iter()
        .copied()
        .zip(example.trained.iter().copied())
}

/// The examples' tokens in rows of `seq_len`: the incomplete last row dropped unless it
/// is the only one.
fn pack<'a>(examples: impl Iterator<Item = &'a Example>, seq_len: usize) -> Vec<Row> {
    let stream: Row = examples.flat_map(row_of).collect();
    let mut rows: Vec<Row> = stream.chunks(seq_len).map(<[_]>::to_vec).collect();
    if rows.len() > 1 && rows.last().is_some_and(|r| r.len() < seq_len) {
        rows.pop();
    }
    rows
}

/// A batch of `rows`, each padded on the right with `pad_id` to `width`.
fn batch_of(rows: &[Row], width: usize, pad_id: u32, device: &Device) -> Result<Batch> {
    let mut ids = Vec::with_capacity(rows.len() * width);
    let mut mask = Vec::with_capacity(rows.len() * width);
    for row in rows {
        for t in 0..width {
            let (id, target) = match row.get(t) {
                Some(&(id, trained)) => (id, trained && t > 0),
                None => (pad_id, false),
            };
            ids.push(id);
            mask.push(if target { 1f32 } else { 0f32 });
        }
    }
    let target_tokens = mask.iter().filter(|&&m| m > 0.0).count();
    let shape = (rows.len(), width);
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, shape, device)?,
        loss_mask: Tensor::from_vec(mask, shape, device)?,
        target_tokens,
    })
}
