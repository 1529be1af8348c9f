//! PEFT's LoRA extensions (`lorakit::peft::lora_extensions`) on adapters real PEFT 0.21
//! wrote onto the Mistral model fixture (`tests/fixtures/peft_extensions/`,
//! `scripts/make_extension_fixtures.py`): those that change what the adapter computes are
//! refused by name wherever an adapter is read, Activated LoRA wherever lorakit would
//! compute it (a plan, a merge); PiSSA and OLoRA adapters, whose base weights PEFT
//! replaces by a residual, give PEFT's logits with the residual recomputed, and are refused
//! for GGUF; VeLoRA and MonteCLoRA, which change only
//! PEFT's training, give PEFT's evaluation logits unmerged and merged (f32, ≤ 1e-4
//! relative) and save back as plain LoRA.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lorakit::gguf::export_gguf;
use lorakit::peft::{inspect, merge_checkpoint, save_adapter, MergeOptions, PeftAdapter};

use crate::models_llama::{build, check, logits, models, no_adapter, peft_plan};
use crate::peft_common::{fixture, load, rel_err, temp_dir};

const TOL: f64 = 1e-4;

fn case(name: &str) -> PathBuf {
    fixture("peft_extensions").join(name)
}

/// The Mistral model fixture the extension (and pickle) adapters were made on.
pub(crate) fn mistral_base() -> PathBuf {
    models("mistral").join("base")
}

#[test]
fn extensions_that_change_the_output_are_refused_by_name() {
    let base = mistral_base();
    for (name, field) in [
        ("bdlora", "use_bdlora"),
        ("kasa", "kasa_config"),
        ("layer_replication", "layer_replication"),
    ] {
        let dir = case(name);
        let named = |what: &str, err| assert_names(err, field, &format!("{name} {what}"));
        named("load", PeftAdapter::load(&dir, &Device::Cpu).unwrap_err());
        named("inspect", inspect(&dir).unwrap_err());
        let out = temp_dir(&format!("extension-merge-{name}"));
        let merged = out.join("merged");
        let err = merge_checkpoint(&base, &dir, &merged, MergeOptions::default());
        named("merge", err.unwrap_err());
        assert!(!merged.exists(), "{name}: a refused merge wrote {merged:?}");
        std::fs::remove_dir_all(out).unwrap();
    }
}

/// LoRA on parameters loads (lorakit folds it into a mixture of experts' experts and
/// router: `models_moe.rs`), but on a Mistral's `q_proj.weight` it stays unused: the
/// model's build names `target_parameters`, and a merge refuses it.
#[test]
fn parameter_lora_outside_experts_is_named_not_applied() {
    let dir = case("target_parameters");
    let adapter = PeftAdapter::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(adapter.config().target_parameters, ["q_proj.weight"]);
    let plan = adapter.plan().unwrap();
    let config = lorakit::models::llama::LlamaConfig::from_file(mistral_base()).unwrap();
    let vb = lorakit::checkpoint::Checkpoint::open(mistral_base())
        .unwrap()
        .var_builder(candle_core::DType::F32, &Device::Cpu);
    lorakit::models::llama::LlamaForCausalLM::load(&config, vb, &plan).unwrap();
    assert_names(plan.finish().unwrap_err(), "target_parameters", "build");
    let out = temp_dir("extension-merge-target-parameters");
    let merged = out.join("merged");
    let err = merge_checkpoint(&mistral_base(), &dir, &merged, MergeOptions::default());
    let msg = err.unwrap_err().to_string();
    assert!(
        msg.contains("target_parameters") && msg.contains("q_proj.weight"),
        "{msg}"
    );
    assert!(!merged.exists());
    std::fs::remove_dir_all(out).unwrap();
}

fn assert_names(err: lorakit::Error, field: &str, what: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(field) && msg.contains("adapter_config.json"),
        "{what}: {msg}"
    );
}

/// Activated LoRA reads (inspect shows it; export-gguf writes it for llama.cpp) but is
/// refused where lorakit would compute it: a plan of layers, a merge.
#[test]
fn activated_lora_is_read_but_not_computed() {
    let dir = case("alora");
    let adapter = PeftAdapter::load(&dir, &Device::Cpu).unwrap();
    let field = "alora_invocation_tokens";
    assert_names(adapter.plan().err().unwrap(), field, "plan");
    inspect(&dir).unwrap();
    let out = temp_dir("extension-merge-alora");
    let merged = out.join("merged");
    let err = merge_checkpoint(&mistral_base(), &dir, &merged, MergeOptions::default());
    assert_names(err.unwrap_err(), field, "merge");
    assert!(!merged.exists());
    std::fs::remove_dir_all(out).unwrap();
}

/// PiSSA and OLoRA adapters (PEFT replaces each targeted base weight by a residual when it
/// loads them): lorakit recomputes the residual and gives PEFT's logits unmerged, merged
/// and with the adapter disabled (the residual base alone); a GGUF export, which llama.cpp would add to the stored base, is refused naming
/// the init and nothing is written. The adapter inspects, saying what the init does.
#[test]
fn inits_that_change_the_base_give_peft_logits_and_are_refused_for_gguf() {
    let io = load(&case("logits.safetensors"));
    let ids = &io["input_ids"];
    let base = mistral_base();
    for name in ["pissa", "olora"] {
        let dir = case(name);
        let want = &io[&format!("{name}_logits")];
        let plan = peft_plan(&dir);
        let model = build(&base.join("config.json"), &base, DType::F32, &plan);
        let set = plan.finish().unwrap();
        check(&logits(&model, ids), want, TOL, &format!("{name} unmerged"));
        // Disabled, the layers run the residual base, as PEFT's `disable_adapter()`.
        set.set_enabled(false);
        let disabled = &io[&format!("{name}_disabled_logits")];
        check(
            &logits(&model, ids),
            disabled,
            TOL,
            &format!("{name} disabled"),
        );
        set.set_enabled(true);
        check(
            &merged_mistral_logits(&dir, ids),
            want,
            TOL,
            &format!("{name} merged"),
        );

        let summary = inspect(&dir).unwrap().to_string();
        assert!(
            summary.contains(&format!("init_lora_weights: {name}")),
            "{summary}"
        );
        let out = temp_dir(&format!("extension-gguf-{name}"));
        let gguf = out.join("a.gguf");
        let err = export_gguf(&dir, &base, &gguf, &Default::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("\"{name}\"")), "{msg}");
        assert!(
            msg.contains("path_initial_model_for_weight_conversion"),
            "{msg}"
        );
        assert_names(err, "init_lora_weights", &format!("{name} export"));
        assert!(!gguf.exists());
        std::fs::remove_dir_all(out).unwrap();
    }
}

/// PEFT's conversion of a PiSSA or OLoRA adapter to plain LoRA (rank 2r, on the original
/// base; what the GGUF refusal names) gives, in lorakit, the logits PEFT computes with the
/// adapter before conversion, unmerged and merged.
#[test]
fn converted_base_changing_adapters_give_peft_logits() {
    let io = load(&case("logits.safetensors"));
    let ids = &io["input_ids"];
    let base = mistral_base();
    for name in ["pissa", "olora"] {
        let dir = case(&format!("{name}_converted"));
        let want = &io[&format!("{name}_logits")];
        let plan = peft_plan(&dir);
        let model = build(&base.join("config.json"), &base, DType::F32, &plan);
        plan.finish().unwrap();
        check(
            &logits(&model, ids),
            want,
            TOL,
            &format!("{name} converted"),
        );
        let merged = merged_mistral_logits(&dir, ids);
        check(&merged, want, TOL, &format!("{name} converted, merged"));
    }
}

/// Why these are refused (aLoRA) or recomputed (PiSSA, OLoRA) rather than loaded as LoRA:
/// with `field` unset, the same A and B on the stored base weights give other logits than
/// PEFT's.
#[test]
fn refused_adapters_loaded_as_plain_lora_would_differ_from_peft() {
    let io = load(&case("logits.safetensors"));
    for (name, field, unset) in [
        ("alora", "alora_invocation_tokens", serde_json::Value::Null),
        ("pissa", "init_lora_weights", true.into()),
        ("olora", "init_lora_weights", true.into()),
    ] {
        let dir = temp_dir(&format!("{name}-as-lora"));
        std::fs::copy(
            case(&format!("{name}/adapter_model.safetensors")),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let config = std::fs::read_to_string(case(&format!("{name}/adapter_config.json")));
        let mut json: serde_json::Value = serde_json::from_str(&config.unwrap()).unwrap();
        json[field] = unset;
        std::fs::write(dir.join("adapter_config.json"), json.to_string()).unwrap();

        let base = mistral_base();
        let plan = peft_plan(&dir);
        let model = build(&base.join("config.json"), &base, DType::F32, &plan);
        let want = &io[&format!("{name}_logits")];
        let e = rel_err(&logits(&model, &io["input_ids"]), want);
        assert!(
            e > 1e-2,
            "plain LoRA gave {name}'s logits (relative error {e:.2e})"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// The logits of the Mistral fixture with the adapter at `adapter` merged into its
/// checkpoint by `merge_checkpoint` (as PEFT's `merge_and_unload` would).
pub(crate) fn merged_mistral_logits(adapter: &Path, ids: &Tensor) -> Tensor {
    // One folder per call: tests that merge run at the same time.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = mistral_base();
    let out = temp_dir(&format!("merged-mistral-{call}"));
    merge_checkpoint(&base, adapter, &out.join("m"), MergeOptions::default()).unwrap();
    let merged = build(
        &base.join("config.json"),
        &out.join("m"),
        DType::F32,
        &no_adapter(),
    );
    let got = logits(&merged, ids);
    std::fs::remove_dir_all(out).unwrap();
    got
}

#[test]
fn training_only_extensions_give_peft_logits_unmerged_and_merged() {
    let io = load(&case("logits.safetensors"));
    let ids = &io["input_ids"];
    let base = mistral_base();
    let config = base.join("config.json");
    for name in ["velora", "monteclora"] {
        let want = &io[&format!("{name}_logits")];
        let plan = peft_plan(&case(name));
        let model = build(&config, &base, DType::F32, &plan);
        plan.finish().unwrap();
        check(&logits(&model, ids), want, TOL, &format!("{name} unmerged"));

        let merged = merged_mistral_logits(&case(name), ids);
        check(&merged, want, TOL, &format!("{name} merged"));

        let summary = inspect(&case(name)).unwrap();
        assert!(summary.unknown.is_empty(), "{name}: {:?}", summary.unknown);

        // llama.cpp's format holds the A / B pairs; the training-only tensors stay out.
        let out = temp_dir(&format!("extension-gguf-{name}"));
        let report = export_gguf(&case(name), &base, &out.join("a.gguf"), &Default::default());
        assert_eq!(report.unwrap().pairs, 4, "{name}");
        std::fs::remove_dir_all(out).unwrap();
    }
}

#[test]
fn a_training_only_extension_saves_back_as_plain_lora() {
    let adapter = PeftAdapter::load(case("velora"), &Device::Cpu).unwrap();
    assert_eq!(adapter.config().skipped_tensors, ["lora_velora_embed"]);
    let base = mistral_base();
    let plan = adapter.plan().unwrap();
    let _model = build(&base.join("config.json"), &base, DType::F32, &plan);
    let set = plan.finish().unwrap();
    let dir = temp_dir("velora-saved");
    save_adapter(&dir, adapter.config(), &set).unwrap();
    let saved = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert!(saved.get("velora_config").is_none(), "{saved}");
    let reloaded = PeftAdapter::load(&dir, &Device::Cpu).unwrap();
    assert!(reloaded
        .tensor_names()
        .iter()
        .all(|k| !k.contains("velora")));
    std::fs::remove_dir_all(dir).unwrap();
}
