//! Adapters made by real PEFT (scripts/make_peft_fixtures.py): lorakit's outputs, merged
//! weights and `merge` command against PEFT's, relative error ≤ 1e-5.

use crate::peft_common::{assert_close, fixture, load, rel_err, temp_dir, Chain};
use candle_core::DType;
use lorakit::peft::{merge_files, PeftAdapter};

const TOL: f64 = 1e-5;

/// Loads the case's adapter onto its base model and checks outputs (adapted, disabled,
/// merged, unmerged) and merged weights against PEFT's.
fn check_case(case: &str) {
    let dir = fixture(case);
    let adapter = PeftAdapter::load(dir.join("adapter"), &candle_core::Device::Cpu).unwrap();
    let plan = adapter.plan().unwrap();
    let model = Chain::build(case, &plan).unwrap();
    let set = plan.finish().unwrap();
    let expected = load(&dir.join("expected.safetensors"));
    let merged = load(&dir.join("merged.safetensors"));
    let base = load(&dir.join("base.safetensors"));
    let x = &expected["input"];

    assert_close(
        &model.forward(x),
        &expected["output"],
        TOL,
        "adapted output",
    );
    set.set_enabled(false);
    assert_close(
        &model.forward(x),
        &expected["base_output"],
        TOL,
        "disabled output",
    );
    set.set_enabled(true);

    set.merge_all(true).unwrap();
    assert_close(&model.forward(x), &expected["output"], TOL, "merged output");
    for (path, layer) in set.layers() {
        let key = format!("{path}.weight");
        assert_close(layer.read().base().weight(), &merged[&key], TOL, &key);
    }
    set.unmerge_all().unwrap();
    for (path, layer) in set.layers() {
        let key = format!("{path}.weight");
        assert_close(
            layer.read().base().weight(),
            &base[&key],
            TOL,
            &format!("unmerged {key}"),
        );
    }
    assert_close(
        &model.forward(x),
        &expected["output"],
        TOL,
        "unmerged output",
    );

    // The merge command gives PEFT's merge_and_unload() state dict.
    let out_dir = temp_dir(&format!("fixture-{case}"));
    let out = out_dir.join("merged.safetensors");
    merge_files(&dir.join("base.safetensors"), &dir.join("adapter"), &out).unwrap();
    let got = load(&out);
    let mut names: Vec<_> = got.keys().collect();
    names.sort();
    let mut want: Vec<_> = merged.keys().collect();
    want.sort();
    assert_eq!(names, want, "{case}: tensor names");
    for (k, t) in &merged {
        assert_eq!(got[k].dtype(), DType::F32);
        assert_close(&got[k], t, TOL, &format!("{case}: merged file {k}"));
    }
}

#[test]
fn lora_mlp() {
    check_case("lora_mlp");
}

#[test]
fn rslora_rank_alpha_patterns_regex_target() {
    check_case("rslora_patterns");
}

#[test]
fn llama_module_names() {
    check_case("llama_names");
}

/// DoRA: `(m / ‖W + ΔW‖_row) ⊙ (W + ΔW)`, a layer without bias.
#[test]
fn dora() {
    check_case("dora");
}

/// VeRA on layers of different shapes (10→20, 20→6): each slices the shared pair.
#[test]
fn vera_different_shapes() {
    check_case("vera");
}

/// AdaLoRA after real pruning steps: truncated ranks (2, 3, 1 of init_r = 6), scale
/// `alpha / (init_r + 1e-5)`.
#[test]
fn adalora_after_pruning() {
    check_case("adalora");
}

/// PEFT merged the same adapter into f16 and bf16 copies of the base: the merge command
/// keeps the dtype and gives PEFT's tensors bit for bit (both add the f32 ΔW to the half
/// weight and round once; PEFT's `autocast_adapter_dtype` keeps the adapter in f32).
#[test]
fn merge_keeps_half_dtypes() {
    let dir = fixture("lora_mlp");
    for (tag, dtype) in [("f16", DType::F16), ("bf16", DType::BF16)] {
        let out_dir = temp_dir(&format!("half-{tag}"));
        let out = out_dir.join("merged.safetensors");
        merge_files(
            &dir.join(format!("base_{tag}.safetensors")),
            &dir.join("adapter"),
            &out,
        )
        .unwrap();
        let got = load(&out);
        let want = load(&dir.join(format!("merged_{tag}.safetensors")));
        assert_eq!(got.len(), want.len());
        for (k, t) in &want {
            assert_eq!(got[k].dtype(), dtype, "{k}");
            assert_eq!(rel_err(&got[k], t), 0.0, "{tag} {k}");
        }
        // Bias tensors are copied byte for byte.
        let b = "lin0.bias";
        let diff = (got[b].to_dtype(DType::F32).unwrap() - want[b].to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }
}

/// The adapter attaches to a half-precision model too (tensors converted to the base's
/// dtype); outputs agree with PEFT's f32 ones to half-precision accuracy.
#[test]
fn attach_to_half_precision_model() {
    let dir = fixture("lora_mlp");
    let expected = load(&dir.join("expected.safetensors"));
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        let adapter = PeftAdapter::load(dir.join("adapter"), &candle_core::Device::Cpu).unwrap();
        let plan = adapter.plan().unwrap();
        let model = Chain::build_dtype("lora_mlp", &plan, dtype).unwrap();
        plan.finish().unwrap();
        let y = model.forward(&expected["input"].to_dtype(dtype).unwrap());
        assert_eq!(y.dtype(), dtype);
        assert_close(&y, &expected["output"], tol, &format!("{dtype:?} output"));
    }
}
