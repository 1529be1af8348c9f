//! [`Cursor`]: the training data as an endless stream of batches, epoch after epoch, with
//! a position a checkpoint can record and a resumed run can restart from.

use super::batching::BatchOptions;
use super::task::Task;
use crate::error::{Error, Result};

/// The position in the stream: epoch and batch index within it.
pub(crate) struct Cursor<'d, T: Task> {
    task: &'d T,
    data: &'d T::Data,
    options: BatchOptions,
    seed: u64,
    pub epoch: usize,
    pub index: usize,
    /// The current epoch's batches, built on first use.
    batches: Option<Vec<T::Batch>>,
}

impl<'d, T: Task> Cursor<'d, T> {
    /// A cursor at `(epoch, index)`.
    pub fn new(
        task: &'d T,
        data: &'d T::Data,
        options: BatchOptions,
        seed: u64,
        epoch: usize,
        index: usize,
    ) -> Self {
        Self {
            task,
            data,
            options,
            seed,
            epoch,
            index,
            batches: None,
        }
    }

    /// The next batch, starting a new epoch (a new order) when one ends.
    pub fn next_batch(&mut self) -> Result<T::Batch> {
        loop {
            let batches = match self.batches.take() {
                Some(b) => b,
                None => self
                    .task
                    .batches(self.data, &self.options, self.epoch, self.seed)?,
            };
            if batches.is_empty() {
                return Err(Error::settings(
                    "training data",
                    "batches",
                    "the dataset gives no batch with these options",
                ));
            }
            if let Some(batch) = batches.get(self.index).cloned() {
                self.index += 1;
                self.batches = Some(batches);
                return Ok(batch);
            }
            self.epoch += 1;
            self.index = 0;
        }
    }
}
