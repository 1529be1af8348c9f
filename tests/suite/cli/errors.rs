//! Errors a user can act on: one line `error: …`, a non-zero exit and no panic, naming the
//! missing file, the bad JSON's position, the key and shapes that do not fit, a checkpoint
//! given where the adapter goes.

use std::ffi::OsString;
use std::path::Path;

use super::{fails, lorakit, merge, merge_args, one_error_line, run, write_base};
use crate::peft_common::{fixture, listing, load, temp_dir};

#[test]
fn missing_files_and_bad_arguments() {
    let tmp = temp_dir("cli-missing");
    let adapter = fixture("lora_mlp").join("adapter");
    let missing = tmp.join("nope.safetensors");
    let err = fails(merge(&missing, &adapter, &tmp.join("o")));
    assert!(err.contains("nope.safetensors"), "{err}");
    let err = fails(lorakit(&[&"inspect", &tmp]));
    assert!(err.contains("adapter_config.json"), "{err}");
    let out = lorakit(&[&"merge", &"--base", &missing]);
    assert_eq!(out.status.code(), Some(2), "a usage error exits 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("required arguments were not provided") && err.contains("--adapter <DIR>"),
        "{err}"
    );
    assert!(err.contains("Usage: lorakit merge"), "{err}");
    let out = lorakit(&[&"frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unrecognized subcommand 'frobnicate'"),
        "{err}"
    );
    assert!(!tmp.join("o").exists());
}

#[test]
fn bad_json_reports_its_position() {
    let tmp = temp_dir("cli-json");
    std::fs::write(
        tmp.join("adapter_config.json"),
        "{\n  \"peft_type\": \"LORA\",\n  \"r\": 4,,\n}",
    )
    .unwrap();
    let err = fails(lorakit(&[&"inspect", &tmp]));
    assert!(err.contains("line 3, column 10"), "{err}");
    std::fs::write(
        tmp.join("adapter_config.json"),
        r#"{"peft_type": "PROMPT_TUNING"}"#,
    )
    .unwrap();
    let err = fails(lorakit(&[&"inspect", &tmp]));
    assert!(
        err.contains("PROMPT_TUNING") && err.contains("LORA, VERA, ADALORA"),
        "{err}"
    );
    std::fs::write(tmp.join("adapter_config.json"), r#"{"r": 4}"#).unwrap();
    let err = fails(lorakit(&[&"inspect", &tmp]));
    assert!(
        err.contains("peft_type") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_names_key_and_shapes() {
    let tmp = temp_dir("cli-shape");
    let base = tmp.join("base.safetensors");
    write_base(
        &base,
        &[("lin0.weight", (20, 12)), ("lin1.weight", (2, 20))],
    );
    let err = fails(merge(
        &base,
        &fixture("lora_mlp").join("adapter"),
        &tmp.join("o"),
    ));
    // Found from the headers before any work: the weight's shape and the one the adapter's
    // tensors imply.
    assert!(err.contains("`lin0.weight`"), "{err}");
    assert!(
        err.contains("[20, 12]") && err.contains("[20, 10] (out, in)"),
        "{err}"
    );
    assert!(!tmp.join("o").exists());
}

#[test]
fn unused_and_missing_keys_are_errors() {
    let tmp = temp_dir("cli-keys");
    let adapter = fixture("lora_mlp").join("adapter");
    // The base lacks lin1: the adapter's lin1 tensors would be left unused; said before any
    // work, naming the module and the tensor the checkpoint lacks.
    let base = tmp.join("base.safetensors");
    write_base(&base, &[("lin0.weight", (20, 10))]);
    let err = fails(merge(&base, &adapter, &tmp.join("o")));
    assert!(
        err.contains("the adapter has module `lin1`")
            && err.contains("the checkpoint has no `lin1.weight`"),
        "{err}"
    );
    // The adapter lacks lin1's B.
    let bad = tmp.join("adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let mut t = load(&adapter.join("adapter_model.safetensors"));
    t.remove("base_model.model.lin1.lora_B.weight");
    candle_core::safetensors::save(&t, bad.join("adapter_model.safetensors")).unwrap();
    let err = fails(merge(
        &fixture("lora_mlp").join("base.safetensors"),
        &bad,
        &tmp.join("o"),
    ));
    assert!(
        err.contains("missing tensor `base_model.model.lin1.lora_B.weight`"),
        "{err}"
    );
    assert!(!tmp.join("o").exists());
}

#[test]
fn a_checkpoint_given_as_the_adapter_gets_a_helpful_error() {
    let ckpts = fixture("checkpoints");
    let sharded = ckpts.join("llama_f32_sharded");
    let line = one_error_line(
        &lorakit(&[&"inspect", &sharded]),
        &["not a PEFT adapter folder", "--base"],
    );
    assert!(line.contains("21 tensor(s) in 4 file(s)"), "{line}");
    one_error_line(
        &lorakit(&[
            &"inspect",
            &ckpts.join("llama_f32_single/model.safetensors"),
        ]),
        &["is a model checkpoint", "not a PEFT adapter folder"],
    );
    one_error_line(
        &lorakit(&[
            &"inspect",
            &ckpts.join("llama_adapters/lora/adapter_config.json"),
        ]),
        &["give the adapter's folder"],
    );
    // merge with --base and --adapter swapped: said before any work.
    let tmp = temp_dir("cli-swapped");
    let lora = ckpts.join("llama_adapters/lora");
    one_error_line(
        &merge(&lora, &sharded, &tmp.join("o")),
        &["not a PEFT adapter folder", "look swapped"],
    );
    one_error_line(
        &merge(&lora, &ckpts.join("llama_adapters/dora"), &tmp.join("o")),
        &["is a PEFT adapter folder, not a model checkpoint"],
    );
    assert!(listing(&tmp).is_empty());
}

/// Bad input of every kind: one line `error: …`, exit 1, and never `error: layer …` unless
/// the error is about a layer.
#[test]
fn error_lines_name_what_is_wrong() {
    let tmp = temp_dir("cli-error-lines");
    let adapter = fixture("lora_mlp").join("adapter");
    let good_base = fixture("lora_mlp").join("base.safetensors");
    std::fs::write(tmp.join("text.safetensors"), "hello").unwrap();
    let bytes = std::fs::read(&good_base).unwrap();
    std::fs::write(tmp.join("cut.safetensors"), &bytes[..100]).unwrap();
    let bad_json = tmp.join("bad-json");
    std::fs::create_dir_all(&bad_json).unwrap();
    std::fs::write(bad_json.join("adapter_config.json"), "{\"r\": 4,,}").unwrap();
    write_base(
        &tmp.join("shape.safetensors"),
        &[("lin0.weight", (20, 12)), ("lin1.weight", (2, 20))],
    );
    let out = tmp.join("o.safetensors");
    let merge_into_out = |base: &Path, adapter: &Path| merge_args(base, adapter, &out, &[]);
    let cases: Vec<(Vec<OsString>, &str)> = vec![
        (
            merge_into_out(&tmp.join("missing.safetensors"), &adapter),
            "missing.safetensors: No such file",
        ),
        (
            merge_into_out(&tmp.join("text.safetensors"), &adapter),
            "text.safetensors: safetensors error",
        ),
        (
            merge_into_out(&tmp.join("cut.safetensors"), &adapter),
            "cut.safetensors: safetensors error",
        ),
        (
            merge_into_out(&good_base, &tmp.join("no-adapter")),
            "no-adapter/adapter_config.json",
        ),
        (
            merge_into_out(&good_base, &bad_json),
            "invalid JSON at line 1, column 9",
        ),
        (
            vec!["inspect".into(), tmp.join("no-adapter").into()],
            "adapter_config.json",
        ),
        (
            vec![
                "inspect".into(),
                adapter.clone().into(),
                "--base".into(),
                tmp.join("cut.safetensors").into(),
            ],
            "cut.safetensors",
        ),
    ];
    for (args, want) in cases {
        one_error_line(&run(&args), &[want]);
    }
    // A checkpoint's weight that does not fit the adapter, found before any work.
    let res = merge(&tmp.join("shape.safetensors"), &adapter, &out);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        err.starts_with("error: ")
            && err.contains("shape.safetensors: `lin0.weight` has shape [20, 12]")
            && err.lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
    assert_eq!(
        listing(&tmp),
        [
            "bad-json",
            "cut.safetensors",
            "shape.safetensors",
            "text.safetensors"
        ]
    );
}
