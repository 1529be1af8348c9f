//! `lorakit::finetune` on GPT-2, whose adapted layers are Conv1D (weights stored
//! `(in, out)`) and whose positions are a learned table of `n_positions` rows: the trained
//! adapter saves with `fan_in_fan_out`, `task_type` and `base_model_name_or_path` (as PEFT
//! records them) and merges into the checkpoint in its layout, and a
//! `seq_len` past the position table is refused by name. (PEFT's logits on an adapter the
//! `finetune` example trained on GPT-2: `finetune_train::trained_adapters_give_pefts_logits_in_peft`.)

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::finetune::{AdapterRecipe, Dataset, Example, TrainConfig, Trainer};
use lorakit::model::AdapterPlan;
use lorakit::models::auto::AutoCausalLm;
use lorakit::models::CausalLm;
use lorakit::peft::{merge_checkpoint, MergeOptions, PeftAdapter};
use lorakit::Variant;

use crate::peft_common::{fixture, rel_err, temp_dir};

fn gpt2_base() -> PathBuf {
    fixture("peft_options/gpt2_lora/base")
}

fn load_model(dir: &PathBuf, plan: &AdapterPlan) -> AutoCausalLm {
    AutoCausalLm::from_pretrained(dir, DType::F32, &Device::Cpu, plan).unwrap()
}

/// A fresh adapter of `variant` on every Conv1D, its model, and the adapted set.
fn fresh(variant: Variant) -> (AutoCausalLm, AdapterRecipe, lorakit::model::AdaptedSet) {
    fresh_at(&gpt2_base(), variant)
}

/// [`fresh`] on the GPT-2 checkpoint in `base`.
fn fresh_at(
    base: &Path,
    variant: Variant,
) -> (AutoCausalLm, AdapterRecipe, lorakit::model::AdaptedSet) {
    let dev = Device::Cpu;
    let base = base.to_path_buf();
    let recipe = AdapterRecipe::new(variant, 4, 8.0, &["c_attn", "c_proj", "c_fc"]);
    let vb = VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev);
    let shapes = AutoCausalLm::linear_shapes(&base).unwrap();
    let plan = recipe.plan(vb, &shapes, DType::F32, &dev).unwrap();
    let model = load_model(&base, &plan);
    (model, recipe, plan.finish().unwrap())
}

fn data() -> Dataset {
    let examples = (0..8)
        .map(|i| {
            let ids: Vec<u32> = (0..12).map(|k| ((i * 7 + k * 3) % 60) as u32).collect();
            Example::new(ids, vec![true; 12]).unwrap()
        })
        .collect();
    Dataset::from_examples(examples)
}

fn config(steps: usize) -> TrainConfig {
    let mut config = TrainConfig::new(steps);
    config.lr = 1e-2;
    config.batch.batch_size = 4;
    config.batch.seq_len = 12;
    config
}

fn probe_logits(model: &dyn CausalLm) -> Tensor {
    let ids = Tensor::new(&[[1u32, 5, 9, 12, 3, 7, 30, 2, 8]], &Device::Cpu).unwrap();
    model.logits(&ids).unwrap()
}

#[test]
fn trained_conv1d_adapters_save_reload_and_merge_in_their_layout() {
    for variant in [Variant::Lora, Variant::Dora] {
        let (model, recipe, set) = fresh(variant);
        let mut trainer = Trainer::new(&model, set, recipe, config(6)).unwrap();
        trainer.train(&data(), None, |_| {}).unwrap();
        let trained = probe_logits(&model);
        let dir = temp_dir(&format!("finetune-gpt2-{variant}"));
        trainer.save_adapter(dir.join("adapter")).unwrap();

        let adapter = PeftAdapter::load(dir.join("adapter"), &Device::Cpu).unwrap();
        assert!(adapter.config().fan_in_fan_out, "{variant}");
        // What PEFT's AutoPeftModelForCausalLM needs to find and build the base model.
        let raw = &adapter.config().raw;
        assert_eq!(raw["task_type"], "CAUSAL_LM");
        let base = gpt2_base().display().to_string();
        assert_eq!(raw["base_model_name_or_path"], base.as_str());
        let plan = adapter.plan().unwrap();
        let reloaded = load_model(&gpt2_base(), &plan);
        plan.finish().unwrap();
        let err = rel_err(&probe_logits(&reloaded), &trained);
        assert!(err < 1e-5, "{variant} reloaded: {err:e}");

        // The merge writes each update into the (in, out) weight as stored.
        let merged_dir = dir.join("merged");
        merge_checkpoint(
            &gpt2_base(),
            &dir.join("adapter"),
            &merged_dir,
            MergeOptions::default(),
        )
        .unwrap();
        let merged = load_model(&merged_dir, &AdapterPlan::none());
        let err = rel_err(&probe_logits(&merged), &trained);
        assert!(err < 1e-5, "{variant} merged: {err:e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// The training loop runs GPT-2 in training mode: the config's dropouts (0.1 each in the
/// fixture) draw anew in every run, so two runs log other first-step losses, though a
/// fresh adapter starts at the base model (B = 0) and the data order is seeded; with the
/// dropouts at 0 in `config.json` the two first steps log the same loss.
#[test]
fn training_runs_the_model_with_its_dropouts() {
    let first_loss = |base: &Path| -> f64 {
        let (model, recipe, set) = fresh_at(base, Variant::Lora);
        assert_eq!(recipe.dropout, 0.0, "no adapter dropout");
        let mut trainer = Trainer::new(&model, set, recipe, config(1)).unwrap();
        let report = trainer.train(&data(), None, |_| {}).unwrap();
        report.history[0].loss.unwrap()
    };
    let (a, b) = (first_loss(&gpt2_base()), first_loss(&gpt2_base()));
    assert_ne!(a, b, "dropout draws differ between runs");
    let dir = temp_dir("finetune-gpt2-no-dropout");
    for entry in std::fs::read_dir(gpt2_base()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let config_file = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    for field in ["embd_pdrop", "attn_pdrop", "resid_pdrop"] {
        config[field] = serde_json::json!(0.0);
    }
    std::fs::write(&config_file, config.to_string()).unwrap();
    let (a, b) = (first_loss(&dir), first_loss(&dir));
    assert_eq!(a, b, "without dropout the first step is deterministic");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn seq_len_past_the_position_table_is_refused_by_name() {
    let (model, recipe, set) = fresh(Variant::Lora);
    assert_eq!(model.max_positions(), Some(16));
    let mut config = config(2);
    config.batch.seq_len = 17;
    let err = Trainer::new(&model, set, recipe, config).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("seq_len") && msg.contains("17") && msg.contains("16"),
        "{msg}"
    );
}

/// The tied output head (`wte`'s frozen table, through the fused op) passes the loss's
/// gradient down to the lowest block: the gradient of one `lora_B` element of
/// `h.0.attn.c_attn` equals a central difference of the loss.
#[test]
fn the_tied_head_passes_the_gradient_to_the_lowest_adapter() {
    let (model, _, set) = fresh(Variant::Lora);
    let ids = Tensor::new(&[[1u32, 5, 9, 12, 3, 7, 30, 2, 8]], &Device::Cpu).unwrap();
    let targets = Tensor::new(&[5u32, 9, 12, 3, 7, 30, 2, 8], &Device::Cpu).unwrap();
    let loss = || {
        let logits = model.logits(&ids).unwrap().squeeze(0).unwrap();
        let logits = logits.narrow(0, 0, 8).unwrap();
        candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
    };
    let vars = set.trainable_vars();
    let b = vars
        .iter()
        .find(|v| v.full_name().contains("h.0.attn.c_attn") && v.var.name == "lora_B")
        .expect("h.0's c_attn lora_B")
        .var
        .var
        .clone();
    let grads = loss().backward().unwrap();
    let g = grads
        .get(b.as_tensor())
        .expect("a gradient for h.0's lora_B");
    let (rows, cols) = g.dims2().unwrap();
    let flat: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
    // The element with the largest gradient, and a step that moves the loss measurably.
    let (at, &want) = flat
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
        .unwrap();
    assert!(
        want.abs() > 1e-4,
        "a gradient this small tests nothing: {want:e}"
    );
    let original = b.as_tensor().copy().unwrap();
    let eps = 1e-2f64;
    let at_eps = |sign: f64| {
        let mut bump = vec![0f32; rows * cols];
        bump[at] = (sign * eps) as f32;
        let bump = Tensor::from_vec(bump, (rows, cols), &Device::Cpu).unwrap();
        b.set(&(&original + bump).unwrap()).unwrap();
        loss().to_scalar::<f32>().unwrap() as f64
    };
    let (up, down) = (at_eps(1.0), at_eps(-1.0));
    b.set(&original).unwrap();
    let numeric = (up - down) / (2.0 * eps);
    let err = (numeric - want as f64).abs() / (want.abs() as f64);
    assert!(
        err < 2e-2,
        "autograd {want:e}, central difference {numeric:e} ({err:e})"
    );
}

/// `CausalLm::loss_sum` (the frozen tied head and the loss as one op) gives the loss and
/// every adapter gradient that the logits and candle's composed cross-entropy give, with
/// masked positions; `eval_loss_sum` the same value without a gradient.
#[test]
fn the_fused_head_loss_equals_the_logits_and_the_composed_loss() {
    let (model, _, set) = fresh(Variant::Lora);
    // A non-zero B, so that both factors get gradients.
    for v in set.trainable_vars() {
        let t = v.var.var.as_tensor();
        let bumped = Tensor::randn(0f32, 0.1, t.dims(), &Device::Cpu).unwrap();
        v.var.var.set(&bumped).unwrap();
    }
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 12, 3, 7], [30, 2, 8, 8, 4, 0]], &dev).unwrap();
    let mask = Tensor::new(
        &[[0f32, 0., 1., 1., 1., 1.], [0., 1., 1., 0., 1., 1.]],
        &dev,
    )
    .unwrap();
    let fused = model.loss_sum(&ids, &mask).unwrap();
    let logits = model.logits(&ids).unwrap();
    let composed =
        lorakit::finetune::loss::causal_lm_loss_sum_composed(&logits, &ids, &mask).unwrap();
    let (f, c) = (
        fused.to_scalar::<f32>().unwrap(),
        composed.to_scalar::<f32>().unwrap(),
    );
    assert!((f - c).abs() < 1e-5 * c.abs(), "loss {f} vs {c}");
    // Evaluation: the same value, no gradient.
    let eval = model.eval_loss_sum(&ids, &mask).unwrap();
    assert!(!eval.track_op());
    assert_eq!(eval.to_scalar::<f32>().unwrap(), f);
    let (gf, gc) = (fused.backward().unwrap(), composed.backward().unwrap());
    let vars = set.trainable_vars();
    assert!(!vars.is_empty());
    for v in vars {
        let t = v.var.var.as_tensor();
        let (a, b) = (gf.get(t).unwrap(), gc.get(t).unwrap());
        let err = rel_err(a, b);
        assert!(err < 1e-4, "{}: {err:e}", v.full_name());
    }
}
