//! The two tasks, generated from a seed: task A (pretraining) sorts a digit sequence, task B
//! (adaptation) reverses it. A model trained on sorting does poorly on reversing, so the
//! adapters have real work to do.

use candle_core::{Device, Tensor};
use lorakit::init::SeededRng;

/// Digits 0..VOCAB.
pub const VOCAB: usize = 10;
/// Sequence length.
pub const SEQ: usize = 8;

/// Which task a batch is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Output the input sorted ascending.
    Sort,
    /// Output the input reversed.
    Reverse,
}

/// A batch: inputs `(n, SEQ)` and targets `(n, SEQ)`, u32 token ids.
pub struct Batch {
    pub inputs: Tensor,
    pub targets: Tensor,
}

/// Draws `n` random sequences and their targets for `task` from `rng`.
pub fn batch(task: Task, n: usize, rng: &mut SeededRng, dev: &Device) -> lorakit::Result<Batch> {
    let digits = rng.uniform((n, SEQ), 0.0, VOCAB as f64, candle_core::DType::F64, dev)?;
    let digits: Vec<Vec<f64>> = digits.to_vec2()?;
    let mut inputs = Vec::with_capacity(n * SEQ);
    let mut targets = Vec::with_capacity(n * SEQ);
    for row in digits {
        let seq: Vec<u32> = row
            .iter()
            .map(|v| (*v as u32).min(VOCAB as u32 - 1))
            .collect();
        let mut out = seq.clone();
        match task {
            Task::Sort => out.sort_unstable(),
            Task::Reverse => out.reverse(),
        }
        inputs.extend(seq);
        targets.extend(out);
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (n, SEQ), dev)?,
        targets: Tensor::from_vec(targets, (n, SEQ), dev)?,
    })
}
