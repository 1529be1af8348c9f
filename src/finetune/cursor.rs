//! [`Cursor`]: the training data as an endless stream of batches, epoch after epoch, with
//! a position a checkpoint can record and a resumed run can restart from.

use candle_core::Device;

use super::batching::{Batch, BatchOptions};
use super::data::Dataset;
use crate::error::{Error, Result};

/// The position in the stream: epoch and batch index within it.
pub(crate) struct Cursor<'d> {
    data: &'d Dataset,
    options: BatchOptions,
    seed: u64,
    device: Device,
    pub epoch: usize,
    pub index: usize,
    /// The current epoch's batches, built on first use.
    batches: Option<Vec<Batch>>,
}

impl<'d> Cursor<'d> {
    /// A cursor at `(epoch, index)`.
    pub fn new(
        data: &'d Dataset,
        options: BatchOptions,
        seed: u64,
        device: &Device,
        epoch: usize,
        index: usize,
    ) -> Self {
        Self {
            data,
            options,
            seed,
            device: device.clone(),
            epoch,
            index,
            batches: None,
        }
    }

    /// The next batch, starting a new epoch (a new order) when one ends.
    pub fn next_batch(&mut self) -> Result<Batch> {
        loop {
            let batches = match self.batches.take() {
                Some(b) => b,
                None => self
                    .data
                    .batches(&self.options, self.epoch, self.seed, &self.device)?,
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
