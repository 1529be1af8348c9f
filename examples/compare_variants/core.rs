//! The experiment: pretrain on task A, then adapt to task B with each method, measuring
//! accuracy, loss, parameters and speed. `main.rs` adds the command line, progress bars and
//! the written report; the test suite runs [`run`] in quick mode.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;

use crate::methods::{Method, Prepared};
use crate::model::{ModelConfig, Transformer};
use crate::tasks::{batch, Task};

/// Sizes and step counts of one run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub model: ModelConfig,
    pub batch: usize,
    pub pretrain_steps: usize,
    pub pretrain_lr: f64,
    pub adapt_steps: usize,
    pub eval_size: usize,
    pub seed: u64,
}

impl Settings {
    /// Defaults: finish in a few minutes on 2 CPU cores in release mode.
    pub fn full(seed: u64) -> Self {
        Self {
            model: ModelConfig {
                d_model: 64,
                heads: 4,
                layers: 2,
                d_mlp: 128,
            },
            batch: 64,
            pretrain_steps: 1500,
            pretrain_lr: 3e-3,
            adapt_steps: 400,
            eval_size: 512,
            seed,
        }
    }

    /// A smaller, faster run for CI.
    pub fn quick(seed: u64) -> Self {
        Self {
            batch: 32,
            pretrain_steps: 300,
            adapt_steps: 100,
            eval_size: 256,
            ..Self::full(seed)
        }
    }
}

/// One method's outcome.
#[derive(Clone, Debug)]
pub struct MethodResult {
    pub method: Method,
    pub trainable_params: usize,
    pub expected_params: usize,
    pub acc_before: f64,
    pub acc_after: f64,
    pub final_loss: f64,
    pub ms_per_step: f64,
    pub losses: Vec<f64>,
    /// The method's own decisions, if it reports any (LoRA-drop's selection).
    pub note: Option<String>,
}

/// The pretrained model: its tensors by name, and its accuracy on both tasks.
pub struct Pretrained {
    pub tensors: HashMap<String, Tensor>,
    pub acc_task_a: f64,
    pub acc_task_b: f64,
}

/// Progress callbacks (the example draws bars; tests pass a no-op).
pub trait Progress {
    fn start(&mut self, label: &str, steps: usize);
    fn step(&mut self, loss: f64);
    fn finish(&mut self);
}

/// Pretrains the model on task A with every parameter trainable.
pub fn pretrain(s: &Settings, progress: &mut dyn Progress) -> lorakit::Result<Pretrained> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let plain = |_: &str,
                 i: usize,
                 o: usize,
                 vb: VarBuilder|
     -> lorakit::Result<Box<dyn candle_core::Module>> {
        Ok(Box::new(candle_nn::linear(i, o, vb)?))
    };
    let model = Transformer::new(&s.model, vb, &plain)?;
    seeded_init(&varmap, s.seed)?;
    let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), s.pretrain_lr)?;
    let mut rng = SeededRng::new(s.seed);
    progress.start("pretrain (task A: sort)", s.pretrain_steps);
    for _ in 0..s.pretrain_steps {
        let b = batch(Task::Sort, s.batch, &mut rng, &dev)?;
        let loss = model.loss(&b.inputs, &b.targets)?;
        opt.backward_step(&loss)?;
        progress.step(loss.to_scalar::<f32>()? as f64);
    }
    progress.finish();
    let eval_a = batch(
        Task::Sort,
        s.eval_size,
        &mut SeededRng::new(s.seed + 1),
        &dev,
    )?;
    let eval_b = batch(
        Task::Reverse,
        s.eval_size,
        &mut SeededRng::new(s.seed + 2),
        &dev,
    )?;
    let tensors = varmap_data(&varmap)
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(Pretrained {
        tensors,
        acc_task_a: model.accuracy(&eval_a.inputs, &eval_a.targets)?,
        acc_task_b: model.accuracy(&eval_b.inputs, &eval_b.targets)?,
    })
}

/// The variables of a `VarMap` by name (its lock recovered if a panicking thread poisoned it).
pub fn varmap_data(
    varmap: &VarMap,
) -> std::sync::MutexGuard<'_, HashMap<String, candle_core::Var>> {
    varmap.data().lock().unwrap_or_else(|e| e.into_inner())
}

/// Re-initializes the model's variables from `seed` (candle's CPU init cannot be seeded):
/// linear weights `U(±1/√d_in)`, linear biases 0, embeddings `N(0, 0.5²)`, norms as built.
fn seeded_init(varmap: &VarMap, seed: u64) -> lorakit::Result<()> {
    let data = varmap_data(varmap);
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let (dtype, dev) = (var.dtype(), var.device());
        let mut rng = SeededRng::for_layer(seed, name);
        let value = if name.ends_with("_emb") {
            rng.normal(var.shape(), 0.0, 0.5, dtype, dev)?
        } else if name.contains("norm") {
            continue;
        } else if var.rank() == 2 {
            let (rows, d_in) = var.dims2()?;
            rng.kaiming_uniform_linear(rows, d_in, dtype, dev)?
        } else {
            var.zeros_like()?
        };
        var.set(&value)?;
    }
    Ok(())
}

/// Adapts the pretrained model to task B with `method`.
pub fn adapt(
    s: &Settings,
    pre: &Pretrained,
    method: Method,
    progress: &mut dyn Progress,
) -> lorakit::Result<MethodResult> {
    let dev = Device::Cpu;
    let mut prepared: Prepared = method.prepare(s, pre)?;
    let eval = batch(
        Task::Reverse,
        s.eval_size,
        &mut SeededRng::new(s.seed + 2),
        &dev,
    )?;
    // The pretrained model's accuracy: the adapted model at init equals it, except for
    // LoRA-drop, whose preparation already includes its stage-1 training.
    let acc_before = pre.acc_task_b;
    let mut rng = SeededRng::new(s.seed + 10);
    let mut losses = Vec::with_capacity(s.adapt_steps);
    progress.start(method.name(), s.adapt_steps);
    let start = Instant::now();
    for step in 1..=s.adapt_steps {
        let b = batch(Task::Reverse, s.batch, &mut rng, &dev)?;
        let loss = prepared.model.loss(&b.inputs, &b.targets)?;
        let value = loss.to_scalar::<f32>()? as f64;
        prepared.trainer.step(&prepared.model, &loss, step, &b)?;
        losses.push(value);
        progress.step(value);
    }
    let ms_per_step = start.elapsed().as_secs_f64() * 1e3 / s.adapt_steps as f64;
    progress.finish();
    prepared.trainer.finish(&prepared.model)?;
    let acc_after = prepared.model.accuracy(&eval.inputs, &eval.targets)?;
    let final_loss = losses.iter().rev().take(10).sum::<f64>() / losses.len().clamp(1, 10) as f64;
    Ok(MethodResult {
        method,
        trainable_params: prepared.trainer.trainable_params(),
        expected_params: method.closed_form_params(&s.model, &prepared),
        acc_before,
        acc_after,
        final_loss,
        ms_per_step,
        losses,
        note: prepared.note.take(),
    })
}

/// Pretrains once, then adapts with every method in `methods`.
pub fn run(
    s: &Settings,
    methods: &[Method],
    progress: &mut dyn Progress,
) -> lorakit::Result<(Pretrained, Vec<MethodResult>)> {
    let pre = pretrain(s, progress)?;
    let mut results = Vec::with_capacity(methods.len());
    for &m in methods {
        results.push(adapt(s, &pre, m, progress)?);
    }
    Ok((pre, results))
}
