//! `lorakit::finetune`'s training loop. Checked against PyTorch + transformers + PEFT
//! (`scripts/make_finetune_fixtures.py` → `tests/fixtures/finetune/`): the learning-rate
//! schedules equal `transformers.get_scheduler`'s; one training step (masked causal-LM
//! loss, gradient clipping, AdamW) on a PEFT LoRA over a tiny Qwen2 gives PyTorch's
//! loss, gradient norm and updated weights, with and without gradient accumulation. Then
//! every variant: the loss falls, the saved adapter reloads to the same logits, and a
//! run resumed from a checkpoint ends exactly where the uninterrupted run does.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::schedule::{Decay, LrSchedule};
use lorakit::finetune::{AdapterRecipe, Dataset, Example, TrainConfig, Trainer};
use lorakit::models::auto::AutoCausalLm;
use lorakit::models::llama::{LlamaConfig, LlamaForCausalLM};
use lorakit::models::CausalLm;
use lorakit::peft::PeftAdapter;
use lorakit::Variant;

use crate::peft_common::{fixture, load, rel_err, temp_dir};

fn qwen2() -> PathBuf {
    fixture("models/llama/qwen2")
}

#[test]
fn schedules_equal_transformers() {
    let text = std::fs::read_to_string(fixture("finetune/schedules.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (warmup, total) = (
        json["warmup"].as_u64().unwrap() as usize,
        json["total"].as_u64().unwrap() as usize,
    );
    for (name, decay) in [
        ("cosine", Decay::Cosine { min_ratio: 0.0 }),
        ("linear", Decay::Linear),
        ("constant_with_warmup", Decay::Constant),
        ("cosine_with_min_lr", Decay::Cosine { min_ratio: 0.1 }),
    ] {
        let schedule = LrSchedule::new(warmup, total, decay).unwrap();
        let expected: Vec<f64> = json["cases"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(expected.len(), total);
        for (step, want) in expected.iter().enumerate() {
            let got = schedule.factor(step);
            assert!(
                (got - want).abs() < 1e-12,
                "{name} step {step}: {got} vs transformers {want}"
            );
        }
    }
}

/// The fixture batch as two examples: row 0 with its prompt untrained, row 1 without its
/// padding (the trainer pads it again).
fn step_examples() -> Dataset {
    let batch = load(&fixture("finetune/step/batch.safetensors"));
    let ids = batch["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    let mask = batch["loss_mask"].to_vec2::<f32>().unwrap();
    let examples = ids
        .iter()
        .zip(&mask)
        .enumerate()
        .map(|(row, (ids, mask))| {
            let len = if row == 1 { 6 } else { ids.len() }; // row 1 ends in 3 padding tokens
            Example::new(
                ids[..len].to_vec(),
                mask[..len].iter().map(|&m| m == 1.0).collect(),
            )
            .unwrap()
        })
        .collect();
    Dataset::from_examples(examples)
}

/// The fixture's PEFT LoRA on the tiny Qwen2, trainable, and a trainer for one step.
fn one_step(batch_size: usize, grad_accum: usize, expected_file: &str) {
    let dev = Device::Cpu;
    let adapter = PeftAdapter::load(qwen2().join("lora"), &dev).unwrap();
    let plan = adapter.plan().unwrap();
    let model =
        LlamaForCausalLM::from_pretrained(qwen2().join("base"), DType::F32, &dev, &plan).unwrap();
    let set = plan.finish().unwrap();
    let mut config = TrainConfig::new(1);
    config.lr = 1e-2;
    config.warmup_steps = 0;
    config.decay = Decay::Constant;
    config.batch.batch_size = batch_size;
    config.grad_accum = grad_accum;
    let recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["q_proj"]);
    let mut trainer = Trainer::new(&model, set.clone(), recipe, config).unwrap();
    let report = trainer.train(&step_examples(), None, |_| {}).unwrap();
    let expected = load(&fixture(&format!("finetune/step/{expected_file}")));
    assert_step_equals_pytorch(&report.history[0], &set, &expected);
}

/// The step's loss, its gradient norm and every trainable tensor of `set` after it equal
/// PyTorch's (`expected`: `loss`, `grad_norm` and each tensor by lorakit's name).
pub(crate) fn assert_step_equals_pytorch(
    log: &lorakit::finetune::StepLog,
    set: &lorakit::model::AdaptedSet,
    expected: &HashMap<String, Tensor>,
) {
    let loss = log.loss.expect("the step has targets");
    let want_loss = expected["loss"].to_scalar::<f64>().unwrap();
    let want_norm = expected["grad_norm"].to_scalar::<f64>().unwrap();
    assert!(
        (loss - want_loss).abs() < 1e-5 * want_loss,
        "loss {loss} vs PyTorch {want_loss}"
    );
    assert!(
        (log.grad_norm - want_norm).abs() < 1e-4 * want_norm,
        "grad norm {} vs PyTorch {want_norm}",
        log.grad_norm
    );
    let mut checked = 0;
    for v in set.trainable_vars() {
        let name = v.full_name();
        let want = expected
            .get(&name)
            .unwrap_or_else(|| panic!("{name} trains in lorakit but not in PyTorch"));
        let err = rel_err(v.var.var.as_tensor(), want);
        assert!(err < 1e-4, "{name}: {err:e} from PyTorch's AdamW step");
        checked += 1;
    }
    assert_eq!(checked, expected.len() - 2, "every trained tensor compared");
}

#[test]
fn one_step_equals_pytorch() {
    one_step(2, 1, "expected.safetensors");
}

#[test]
fn accumulated_step_equals_pytorch() {
    one_step(1, 2, "accum_expected.safetensors");
}

/// Sequences over the tiny model's 64-token vocabulary: counting patterns to learn.
/// `n` short examples over tokens 3..=58 (any fixture's vocabulary), trained after the
/// first two tokens.
pub(crate) fn toy_data(n: usize) -> Dataset {
    let examples = (0..n)
        .map(|i| {
            let start = (i * 5 % 50) as u32 + 3;
            let ids: Vec<u32> = (0..12).map(|k| start + (k % 6)).collect();
            let trained = (0..12).map(|k| k >= 2).collect();
            Example::new(ids, trained).unwrap()
        })
        .collect();
    Dataset::from_examples(examples)
}

struct Run {
    model: LlamaForCausalLM,
    trainer_config: TrainConfig,
    recipe: AdapterRecipe,
    set: lorakit::model::AdaptedSet,
}

impl Run {
    /// A trainer over this run's model, adapters and recipe with `config`.
    fn trainer(&self, config: TrainConfig) -> lorakit::Result<Trainer<'_>> {
        Trainer::new(&self.model, self.set.clone(), self.recipe.clone(), config)
    }
}

/// The Llama-family model in `dir` (with `config`, f32, CPU) with `recipe`'s fresh adapter,
/// and its adapted layers.
pub(crate) fn with_recipe(
    dir: &std::path::Path,
    config: &LlamaConfig,
    recipe: &AdapterRecipe,
) -> (LlamaForCausalLM, lorakit::model::AdaptedSet) {
    let dev = Device::Cpu;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let plan = recipe
        .plan(vb, &config.linear_shapes(), DType::F32, &dev)
        .unwrap();
    let model = LlamaForCausalLM::from_pretrained(dir, DType::F32, &dev, &plan).unwrap();
    (model, plan.finish().unwrap())
}

fn build(variant: Variant, steps: usize) -> Run {
    let dir = qwen2().join("base");
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let r = if variant == Variant::Vera { 64 } else { 4 };
    let mut recipe = AdapterRecipe::new(variant, r, 8.0, &["q_proj", "v_proj", "up_proj"]);
    recipe.delta_lora.start_step = 2;
    recipe.lora_drop.stage1_steps = 3;
    let (model, set) = with_recipe(&dir, &config, &recipe);
    let mut trainer_config = TrainConfig::new(steps);
    // VeRA trains only scaling vectors and AdaLoRA starts from E = 0: both want larger rates.
    trainer_config.lr = match variant {
        Variant::Vera => 1e-1,
        Variant::AdaLora => 5e-2,
        _ => 1e-2,
    };
    trainer_config.batch.batch_size = 4;
    trainer_config.batch.seq_len = 12;
    trainer_config.warmup_steps = 1;
    Run {
        model,
        trainer_config,
        recipe,
        set,
    }
}

fn logits(model: &dyn CausalLm) -> Tensor {
    let ids = Tensor::new(
        &[
            [3u32, 4, 5, 6, 7, 8, 3, 4],
            [20, 21, 22, 23, 24, 25, 20, 21],
        ],
        &Device::Cpu,
    )
    .unwrap();
    model.logits(&ids).unwrap()
}

#[test]
fn every_variant_learns_and_saves_what_it_trained() {
    let data = toy_data(16);
    for variant in Variant::ALL {
        let run = build(variant, 12);
        let mut trainer = run.trainer(run.trainer_config.clone()).unwrap();
        let before = trainer.evaluate(&data).unwrap();
        let report = trainer.train(&data, Some(&data), |_| {}).unwrap();
        let after = report.evals.last().unwrap().loss;
        assert!(
            after < 0.95 * before,
            "{variant}: eval loss {before} -> {after}"
        );
        if variant == Variant::LoraDrop {
            assert!(
                report.note.as_deref().unwrap_or("").contains("kept"),
                "{:?}",
                report.note
            );
        }
        // The saved PEFT directory reloads onto a fresh base to the trained model's logits.
        let dir = temp_dir(&format!("finetune-save-{variant}"));
        trainer.save_adapter(&dir).unwrap();
        let trained = logits(&run.model);
        let plan = PeftAdapter::load(&dir, &Device::Cpu)
            .unwrap()
            .plan()
            .unwrap();
        let reloaded = LlamaForCausalLM::from_pretrained(
            qwen2().join("base"),
            DType::F32,
            &Device::Cpu,
            &plan,
        )
        .unwrap();
        plan.finish().unwrap();
        let err = rel_err(&logits(&reloaded), &trained);
        assert!(
            err < 1e-5,
            "{variant}: reloaded adapter's logits differ by {err:e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

fn vars_by_name(set: &lorakit::model::AdaptedSet) -> HashMap<String, Tensor> {
    set.trainable_vars()
        .into_iter()
        .map(|v| (v.full_name(), v.var.var.as_tensor().copy().unwrap()))
        .collect()
}

#[test]
fn resumed_runs_end_where_uninterrupted_runs_do() {
    let data = toy_data(10);
    for variant in Variant::ALL {
        let out = temp_dir(&format!("finetune-resume-{variant}"));
        // Uninterrupted: 8 steps, a checkpoint every 4.
        let straight = build(variant, 8);
        let mut config = straight.trainer_config.clone();
        config.save_every = Some(4);
        config.output_dir = Some(out.clone());
        config.grad_accum = 2;
        let mut trainer = straight.trainer(config.clone()).unwrap();
        let report = trainer.train(&data, None, |_| {}).unwrap();
        assert_eq!(
            report.checkpoints,
            [out.join("checkpoint-4"), out.join("checkpoint-8")]
        );
        let want = vars_by_name(&straight.set);
        let want_logits = logits(&straight.model);

        // Resumed: a fresh model and trainer, built the same way, from checkpoint-4.
        let resumed = build(variant, 8);
        let mut config = config.clone();
        config.output_dir = Some(out.join("resumed"));
        let mut trainer = resumed.trainer(config).unwrap();
        trainer.resume(out.join("checkpoint-4")).unwrap();
        assert_eq!(trainer.steps_done(), 4);
        let report = trainer.train(&data, None, |_| {}).unwrap();
        assert_eq!(report.history.len(), 8);
        let got = vars_by_name(&resumed.set);
        assert_eq!(got.len(), want.len(), "{variant}");
        for (name, w) in &want {
            let g = &got[name];
            let err = rel_err(g, w);
            assert!(
                err < 1e-6,
                "{variant}: {name} differs by {err:e} after resuming"
            );
        }
        // Delta-LoRA's checkpoint-4 is past K = 2: its moved base weights came back too.
        let err = rel_err(&logits(&resumed.model), &want_logits);
        assert!(
            err < 1e-5,
            "{variant}: logits differ by {err:e} after resuming"
        );
        std::fs::remove_dir_all(&out).ok();
    }
}

/// A prompt of 10 tokens and a trained completion of 2: `seq_len` 8 cuts it all off.
fn cut_off_example() -> Example {
    Example::new(vec![5; 12], (0..12).map(|k| k >= 10).collect()).unwrap()
}

#[test]
fn steps_without_target_tokens_change_nothing_and_all_cut_sets_are_refused() {
    let run = build(Variant::Lora, 4);
    let mut config = run.trainer_config.clone();
    config.batch.seq_len = 8;
    config.batch.batch_size = 1;
    config.warmup_steps = 0; // every applied step moves the weights
    let kept = Example::new((3..15).collect(), vec![true; 12]).unwrap();
    let data = Dataset::from_examples(vec![kept, cut_off_example()]);
    assert_eq!(data.examples_without_targets(&config.batch), 1);
    let mut trainer = run.trainer(config.clone()).unwrap();
    let mut snapshots = vec![vars_by_name(&run.set)];
    let report = trainer
        .train(&data, None, |event| {
            if let lorakit::finetune::TrainEvent::Step(_) = event {
                snapshots.push(vars_by_name(&run.set));
            }
        })
        .unwrap();
    let skipped: Vec<usize> = (0..4)
        .filter(|&i| report.history[i].loss.is_none())
        .collect();
    // Two epochs of one kept and one cut example: two steps of each.
    assert_eq!(skipped.len(), 2, "{:?}", report.history);
    for i in 0..4 {
        let changed = snapshots[i + 1]
            .iter()
            .any(|(name, w)| rel_err(w, &snapshots[i][name]) > 0.0);
        assert_eq!(changed, !skipped.contains(&i), "step {}", i + 1);
    }
    // A set with no target token at all is refused by name, for training and evaluation.
    let cut = Dataset::from_examples(vec![cut_off_example(); 3]);
    let mut trainer = run.trainer(config).unwrap();
    for err in [
        trainer.evaluate(&cut).unwrap_err(),
        trainer.train(&cut, None, |_| {}).unwrap_err(),
        trainer.train(&data, Some(&cut), |_| {}).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(msg.contains("seq_len 8"), "{msg}");
    }
}

#[test]
fn resume_refuses_what_it_cannot_continue() {
    let data = toy_data(8);
    let out = temp_dir("finetune-resume-bad");
    let run = build(Variant::DeltaLora, 4);
    let mut config = run.trainer_config.clone();
    config.save_every = Some(3);
    config.output_dir = Some(out.clone());
    let mut trainer = run.trainer(config.clone()).unwrap();
    trainer.train(&data, None, |_| {}).unwrap();
    let checkpoint = out.join("checkpoint-3");
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.json",
        "trainable.safetensors",
        "optimizer.safetensors",
        "delta_lora_base.safetensors",
    ] {
        assert!(checkpoint.join(file).is_file(), "{file} in the checkpoint");
    }

    // Delta-LoRA past its start step K = 2 without its moved base weights.
    std::fs::remove_file(checkpoint.join("delta_lora_base.safetensors")).unwrap();
    let again = build(Variant::DeltaLora, 4);
    let mut t = again.trainer(config.clone()).unwrap();
    let err = t.resume(&checkpoint).unwrap_err().to_string();
    assert!(err.contains("delta_lora_base.safetensors"), "{err}");

    // Another setting than the checkpoint's.
    let lora = build(Variant::Lora, 4);
    let mut c = lora.trainer_config.clone();
    c.save_every = Some(2);
    c.output_dir = Some(out.join("lora"));
    let mut t = lora.trainer(c.clone()).unwrap();
    t.train(&data, None, |_| {}).unwrap();
    let other = build(Variant::Lora, 4);
    let mut changed = c.clone();
    changed.seed += 1;
    let mut t = other.trainer(changed).unwrap();
    let err = t
        .resume(out.join("lora/checkpoint-2"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("seed") && err.contains("trainer_state.json"),
        "{err}"
    );

    // A missing file is named.
    std::fs::remove_file(out.join("lora/checkpoint-2/optimizer.safetensors")).unwrap();
    let mut t = other.trainer(c).unwrap();
    let err = t
        .resume(out.join("lora/checkpoint-2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("optimizer.safetensors"), "{err}");

    // A non-empty checkpoint folder is not overwritten.
    let err = t
        .save_checkpoint(out.join("lora/checkpoint-4"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checkpoint-4"), "{err}");
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn bad_settings_and_data_are_refused_by_name() {
    let run = build(Variant::Lora, 4);
    let mut bad = run.trainer_config.clone();
    bad.lr = f64::NAN;
    let err = run.trainer(bad).err().unwrap().to_string();
    assert!(err.contains("lr"), "{err}");
    let mut bad = run.trainer_config.clone();
    bad.warmup_steps = 10;
    let err = run.trainer(bad).err().unwrap().to_string();
    assert!(err.contains("warmup_steps"), "{err}");
    let mut bad = run.trainer_config.clone();
    bad.save_every = Some(2);
    let err = run.trainer(bad).err().unwrap().to_string();
    assert!(err.contains("output_dir"), "{err}");

    // A recipe of another variant than the layers'.
    let other = AdapterRecipe::new(Variant::Dora, 4, 8.0, &["q_proj"]);
    let err = Trainer::new(
        &run.model,
        run.set.clone(),
        other,
        run.trainer_config.clone(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("DoRA") && err.contains("LoRA"), "{err}");

    // A token the model's vocabulary (64) lacks.
    let mut trainer = run.trainer(run.trainer_config.clone()).unwrap();
    let data = Dataset::from_examples(vec![Example::new(vec![1, 2, 64], vec![true; 3]).unwrap()]);
    let err = trainer.train(&data, None, |_| {}).unwrap_err().to_string();
    assert!(err.contains("64"), "{err}");
    assert_eq!(trainer.steps_done(), 0);

    // A non-finite loss stops the run with an error before the step is applied.
    let fresh = build(Variant::Lora, 4);
    let mut trainer = fresh.trainer(fresh.trainer_config.clone()).unwrap();
    let poisoned = fresh
        .set
        .trainable_vars()
        .into_iter()
        .next()
        .unwrap()
        .var
        .var;
    poisoned
        .set(&(poisoned.as_tensor() * f64::NAN).unwrap())
        .unwrap();
    let err = trainer
        .train(&toy_data(8), None, |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("loss") && err.contains("NaN"), "{err}");
    assert_eq!(trainer.steps_done(), 0);
}

/// `scripts/make_finetune_fixtures.py --check-trained` output for adapters the `finetune`
/// example wrote (a DoRA on Qwen2, a LoRA on GPT-2's Conv1D layers): PEFT's logits on each
/// equal lorakit's.
#[test]
fn trained_adapters_give_pefts_logits_in_peft() {
    for (adapter, base) in [
        ("finetune/trained_dora", qwen2().join("base")),
        (
            "finetune/trained_gpt2_lora",
            fixture("peft_options/gpt2_lora/base"),
        ),
    ] {
        let dir = fixture(adapter);
        let peft = load(&dir.join("peft_logits.safetensors"));
        let plan = PeftAdapter::load(&dir, &Device::Cpu)
            .unwrap()
            .plan()
            .unwrap();
        let model = AutoCausalLm::from_pretrained(base, DType::F32, &Device::Cpu, &plan).unwrap();
        plan.finish().unwrap();
        let err = rel_err(&model.logits(&peft["input_ids"]).unwrap(), &peft["logits"]);
        assert!(err < 1e-5, "{adapter}: lorakit vs PEFT {err:e}");
    }
}

/// The fused CPU cross-entropy and its gradient equal the composed candle ops'.
#[test]
fn fused_loss_and_gradient_equal_the_composed_ops() {
    use lorakit::finetune::loss::{causal_lm_loss_sum, causal_lm_loss_sum_composed};
    let dev = Device::Cpu;
    let logits =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 4., (3, 7, 50), &dev).unwrap()).unwrap();
    let ids = Tensor::rand(0f32, 50., (3, 7), &dev)
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    let mask = Tensor::rand(0f32, 1., (3, 7), &dev)
        .unwrap()
        .ge(0.4)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let fused = causal_lm_loss_sum(logits.as_tensor(), &ids, &mask).unwrap();
    let composed = causal_lm_loss_sum_composed(logits.as_tensor(), &ids, &mask).unwrap();
    let (f, c) = (
        fused.to_scalar::<f32>().unwrap(),
        composed.to_scalar::<f32>().unwrap(),
    );
    assert!((f - c).abs() <= 1e-5 * c.abs(), "loss {f} vs composed {c}");
    let gf = (fused * 0.5).unwrap().backward().unwrap();
    let gc = (composed * 0.5).unwrap().backward().unwrap();
    let err = rel_err(
        gf.get(logits.as_tensor()).unwrap(),
        gc.get(logits.as_tensor()).unwrap(),
    );
    assert!(err < 1e-5, "gradient differs by {err:e}");
}

/// `trainer_state.json` files written before `StepLog::target_tokens` became `targets`
/// still resume.
#[test]
fn step_logs_of_older_checkpoints_still_load() {
    let old = r#"{"step": 1, "loss": 0.5, "lr": 0.1, "grad_norm": 1.0, "target_tokens": 3, "seconds": 0.1}"#;
    let log: lorakit::finetune::StepLog = serde_json::from_str(old).unwrap();
    assert_eq!(log.targets, 3);
}

/// Language modeling that records, for every loss it computes, whether it ran on one of
/// rayon's workers.
struct OnWorkerProbe<'m> {
    inner: lorakit::finetune::LanguageModeling<'m>,
    on_worker: std::sync::Mutex<Vec<bool>>,
}

impl OnWorkerProbe<'_> {
    fn record(&self) {
        if let Ok(mut seen) = self.on_worker.lock() {
            seen.push(rayon::current_thread_index().is_some());
        }
    }
}

impl lorakit::finetune::Task for OnWorkerProbe<'_> {
    type Data = Dataset;
    type Batch = lorakit::finetune::Batch;

    fn device(&self) -> &Device {
        self.inner.device()
    }
    fn max_positions(&self) -> Option<usize> {
        self.inner.max_positions()
    }
    fn check(
        &self,
        data: &Dataset,
        options: &lorakit::finetune::BatchOptions,
        what: &str,
    ) -> lorakit::Result<()> {
        self.inner.check(data, options, what)
    }
    fn batches(
        &self,
        data: &Dataset,
        options: &lorakit::finetune::BatchOptions,
        epoch: usize,
        seed: u64,
    ) -> lorakit::Result<Vec<Self::Batch>> {
        self.inner.batches(data, options, epoch, seed)
    }
    fn units(&self, batch: &Self::Batch) -> usize {
        self.inner.units(batch)
    }
    fn loss_sum(&self, batch: &Self::Batch, train: bool) -> lorakit::Result<Tensor> {
        self.record();
        self.inner.loss_sum(batch, train)
    }
    fn evaluate(&self, batch: &Self::Batch) -> lorakit::Result<(f64, Option<usize>)> {
        self.record();
        self.inner.evaluate(batch)
    }
    fn peft_settings(&self) -> Vec<(&'static str, serde_json::Value)> {
        self.inner.peft_settings()
    }
}

/// The trainer runs its steps and its evaluation on rayon's workers
/// (`lorakit::threads::on_worker`), called from a thread outside the pool.
#[test]
fn steps_and_evaluation_run_on_rayon_workers() {
    let dev = Device::Cpu;
    let plan = PeftAdapter::load(qwen2().join("lora"), &dev)
        .unwrap()
        .plan()
        .unwrap();
    let model =
        LlamaForCausalLM::from_pretrained(qwen2().join("base"), DType::F32, &dev, &plan).unwrap();
    let probe = OnWorkerProbe {
        inner: lorakit::finetune::LanguageModeling::new(&model),
        on_worker: std::sync::Mutex::new(Vec::new()),
    };
    let mut config = TrainConfig::new(2);
    config.batch.batch_size = 2;
    let recipe = AdapterRecipe::new(Variant::Lora, 4, 8.0, &["q_proj"]);
    let mut trainer = Trainer::with_task(probe, plan.finish().unwrap(), recipe, config).unwrap();
    assert_eq!(rayon::current_thread_index(), None);
    let data = step_examples();
    trainer.train(&data, Some(&data), |_| {}).unwrap();
    let seen = trainer.task().on_worker.lock().unwrap().clone();
    assert!(seen.len() >= 3, "two steps and an evaluation: {seen:?}");
    assert!(seen.iter().all(|&on| on), "{seen:?}");
}
