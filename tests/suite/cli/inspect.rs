//! `lorakit inspect`: the adapter's summary, and with `--base` its match against a checkpoint.

use super::{assert_success, lorakit, write_base};
use crate::peft_common::{fixture, temp_dir};

#[test]
fn inspect_summarizes() {
    let out = lorakit(&[&"inspect", &fixture("rslora_patterns").join("adapter")]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("type: LORA (rsLoRA)"), "{text}");
    assert!(text.contains("dtype: f32"), "{text}");
    // rank_pattern {"fc1": 2, "blocks.1.fc2": 3}, alpha 6 (10 for 0.fc2), scale alpha/√r.
    for (path, r, alpha) in [
        ("blocks.0.fc1", 2, 6.0),
        ("blocks.0.fc2", 4, 10.0),
        ("blocks.1.fc2", 3, 6.0),
    ] {
        let line = format!("{path}  rank {r}  scale {}", alpha / f64::sqrt(r as f64));
        assert!(text.contains(&line), "missing `{line}` in\n{text}");
    }
    // A and B of each module: (2·6 + 12·2) + (4·12 + 6·4) + (3·12 + 6·3).
    assert!(text.contains("trainable parameters: 162"), "{text}");
}

#[test]
fn inspect_adalora_keeps_init_r_in_the_scale() {
    let out = lorakit(&[&"inspect", &fixture("adalora").join("adapter")]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("type: ADALORA"), "{text}");
    // Kept ranks from the file's rank_pattern; lora_alpha 4, init_r 6.
    let scale = 4.0 / (6.0 + 1e-5);
    for (path, r) in [("lin0", 2), ("lin1", 3), ("lin2", 1)] {
        let line = format!("{path}  rank {r}  scale {scale}");
        assert!(text.contains(&line), "missing `{line}` in\n{text}");
    }
}

#[test]
fn inspect_with_a_base_names_matched_and_unmatched_modules() {
    let tmp = temp_dir("cli-inspect-base");
    let adapter = fixture("lora_mlp").join("adapter");
    // lin0 fits; lin1's out-features differ from lora_B's (2); head is not targeted.
    let base = tmp.join("base.safetensors");
    write_base(
        &base,
        &[
            ("lin0.weight", (20, 10)),
            ("lin1.weight", (3, 20)),
            ("head.weight", (4, 2)),
        ],
    );
    let out = lorakit(&[&"inspect", &adapter, &"--base", &base]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_success(&out);
    assert!(
        text.contains("type: LORA"),
        "the summary comes first: {text}"
    );
    for line in [
        "matched: 1 of 2 module(s)",
        "  lin0 -> lin0.weight  [20, 10] f32  ok",
        "  lin1 -> lin1.weight  [3, 20] f32  MISMATCH: the adapter's tensors imply [2, 20] (out, in)",
        "not targeted: 1 2-D weight(s) of the checkpoint (head)",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    // A base without lin1.
    write_base(&base, &[("lin0.weight", (20, 10))]);
    let text = String::from_utf8_lossy(&lorakit(&[&"inspect", &adapter, &"--base", &base]).stdout)
        .into_owned();
    assert!(text.contains("  lin1 -> lin1.weight  MISSING"), "{text}");
    assert!(text.contains("matched: 1 of 2 module(s)"), "{text}");
}

#[test]
fn inspect_with_a_sharded_hf_checkpoint_and_a_base_model_warning() {
    let ckpts = fixture("checkpoints");
    let out = lorakit(&[
        &"inspect",
        &ckpts.join("llama_adapters/dora"),
        &"--base",
        &ckpts.join("llama_f32_sharded"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    assert!(text.contains("(21 tensors in 4 file(s))"), "{text}");
    assert!(
        text.contains("  model.layers.0.self_attn.q_proj -> model.layers.0.self_attn.q_proj.weight  [16, 16] f32  ok"),
        "{text}"
    );
    assert!(text.contains("not targeted: 10 2-D weight(s) of the checkpoint (embed_tokens, gate_proj x2, k_proj x2, lm_head, o_proj x2, up_proj x2)"), "{text}");
    // A Llama adapter against a Qwen2 checkpoint: same shapes, a warning on stderr.
    let out = lorakit(&[
        &"inspect",
        &ckpts.join("llama_adapters/lora"),
        &"--base",
        &ckpts.join("qwen2_f32_single"),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("warning: the adapter was trained on `lorakit-fixtures/tiny-llama`")
            && err.contains("qwen2"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("matched: 14 of 14 module(s)"));
}
