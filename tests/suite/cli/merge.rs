//! `lorakit merge`: the output equals PEFT's merge_and_unload(), for a file, a model folder
//! and a sharded folder; `--dtype` and `--quiet`.

use std::collections::HashMap;
use std::path::Path;

use super::{assert_success, lora_mlp_folders, merge, merge_with};
use crate::peft_common::{assert_close, fixture, listing, load, temp_dir};
use candle_core::{DType, Tensor};

#[test]
fn merge_matches_peft_merge_and_unload() {
    for case in [
        "lora_mlp",
        "rslora_patterns",
        "llama_names",
        "dora",
        "vera",
        "adalora",
    ] {
        let dir = fixture(case);
        let out_dir = temp_dir(&format!("cli-{case}"));
        let out = out_dir.join("merged.safetensors");
        assert_success(&merge(
            &dir.join("base.safetensors"),
            &dir.join("adapter"),
            &out,
        ));
        let (got, want) = (load(&out), load(&dir.join("merged.safetensors")));
        assert_eq!(got.len(), want.len(), "{case}");
        for (k, t) in &want {
            assert_close(&got[k], t, 1e-5, &format!("{case}: {k}"));
        }
    }
}

/// `"all-linear"` in a config: with only the base's tensors to go on, the merge adapts the
/// 2-D weights the adapter file has tensors for (and leaves other linears alone).
#[test]
fn merge_all_linear_config() {
    let tmp = temp_dir("cli-all-linear");
    let src = fixture("llama_names");
    let adapter = tmp.join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(
        src.join("adapter/adapter_model.safetensors"),
        adapter.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("adapter/adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["target_modules"] = "all-linear".into();
    config["exclude_modules"] = serde_json::Value::Null;
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    let out = tmp.join("merged.safetensors");
    assert_success(&merge(&src.join("base.safetensors"), &adapter, &out));
    let (got, want) = (load(&out), load(&src.join("merged.safetensors")));
    for (k, t) in &want {
        assert_close(&got[k], t, 1e-5, k);
    }
}

/// A merge that must succeed with nothing on stderr; returns its stdout.
fn merge_ok(base: &Path, adapter: &Path, out: &Path, extra: &[&str]) -> String {
    let res = merge_with(base, adapter, out, extra);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{err}");
    assert!(err.is_empty(), "unexpected stderr: {err}");
    String::from_utf8_lossy(&res.stdout).into_owned()
}

/// Every tensor of the safetensors files in `path` (a file, or a folder's `*.safetensors`).
fn read_checkpoint(path: &Path) -> HashMap<String, Tensor> {
    if path.is_file() {
        return load(path);
    }
    let mut all = HashMap::new();
    for e in std::fs::read_dir(path).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            for (k, t) in load(&p) {
                assert!(all.insert(k.clone(), t).is_none(), "{k} twice");
            }
        }
    }
    all
}

fn assert_bitwise_equal(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>, what: &str) {
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    assert_eq!(names, want_names, "{what}");
    for (k, t) in want {
        let g = &got[k];
        assert_eq!((g.dims(), g.dtype()), (t.dims(), t.dtype()), "{what}: {k}");
        let bits = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bits(g), bits(t), "{what}: {k}");
    }
}

#[test]
fn merges_of_a_folder_and_a_sharded_folder_equal_the_single_file_merge() {
    let tmp = temp_dir("cli-folders");
    let (single, sharded) = lora_mlp_folders(&tmp);
    let adapter = fixture("lora_mlp").join("adapter");
    let file_out = tmp.join("merged.safetensors");
    let text = merge_ok(&single.join("model.safetensors"), &adapter, &file_out, &[]);
    assert!(
        text.contains("merged 2 module(s)") && text.contains("1 file(s)"),
        "{text}"
    );
    let want = read_checkpoint(&file_out);
    let peft = load(&fixture("lora_mlp").join("merged.safetensors"));
    for (k, t) in &peft {
        assert_close(&want[k], t, 1e-5, k);
    }
    for (base, name, shards) in [
        (single.clone(), "from-single", 1),
        (sharded.clone(), "from-sharded", 2),
        (
            sharded.join("model.safetensors.index.json"),
            "from-index",
            2,
        ),
    ] {
        let out = tmp.join(name);
        let text = merge_ok(&base, &adapter, &out, &[]);
        assert!(
            text.contains(&format!("{shards} file(s)")),
            "{name}: {text}"
        );
        assert!(
            text.contains("copied: config.json, tokenizer.json"),
            "{name}: {text}"
        );
        assert_bitwise_equal(&read_checkpoint(&out), &want, name);
        let input = if base.is_dir() {
            base.clone()
        } else {
            sharded.clone()
        };
        assert_eq!(
            listing(&out),
            listing(&input),
            "{name}: the output mirrors the input"
        );
    }
    let index = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(
        index(&tmp.join("from-sharded"))["weight_map"],
        index(&sharded)["weight_map"]
    );
}

#[test]
fn dtype_bf16_writes_every_float_tensor_as_bf16() {
    let tmp = temp_dir("cli-bf16");
    let (_, sharded) = lora_mlp_folders(&tmp);
    let adapter = fixture("lora_mlp").join("adapter");
    let want = load(&fixture("lora_mlp").join("merged.safetensors"));
    let file_out = tmp.join("merged.safetensors");
    let folder_out = tmp.join("merged");
    for (base, out) in [
        (fixture("lora_mlp").join("base.safetensors"), &file_out),
        (sharded, &folder_out),
    ] {
        let text = merge_ok(&base, &adapter, out, &["--dtype", "bf16"]);
        assert!(text.contains("merged 2 module(s)"), "{text}");
        let got = read_checkpoint(out);
        assert_eq!(got.len(), want.len());
        for (k, t) in &got {
            assert_eq!(t.dtype(), DType::BF16, "{}: {k}", out.display());
            assert_close(&t.to_dtype(DType::F32).unwrap(), &want[k], 1e-2, k);
        }
    }
    // --quiet: nothing on stdout, the same file.
    let quiet_out = tmp.join("quiet.safetensors");
    let text = merge_ok(
        &fixture("lora_mlp").join("base.safetensors"),
        &adapter,
        &quiet_out,
        &["--dtype", "bf16", "--quiet"],
    );
    assert!(text.is_empty(), "{text}");
    assert_eq!(
        std::fs::read(&quiet_out).unwrap(),
        std::fs::read(&file_out).unwrap()
    );
}

/// A head tied to the input embedding: the CLI says it wrote it untied and why the config
/// changed (the library's result is checked against PEFT in `tests/suite/tied_head.rs`).
#[test]
fn merge_reports_a_head_written_untied() {
    let case = fixture("tied_head").join("llama");
    let out_dir = temp_dir("cli-tied-head");
    let out = out_dir.join("merged");
    let stdout = merge_ok(&case.join("base"), &case.join("adapter"), &out, &[]);
    assert!(
        stdout.contains("untied (a head tied to the embedding, written as its own tensor): lm_head.weight (tied to model.embed_tokens.weight)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("config.json: tie_word_embeddings: false"),
        "{stdout}"
    );
    assert!(read_checkpoint(&out).contains_key("lm_head.weight"));
}

/// `--pad-token-id` reaches the merged config.json (the option itself is checked in
/// `tests/suite/merged_head.rs`).
#[test]
fn merge_writes_a_given_pad_token_id() {
    let case = fixture("merged_head").join("gpt2");
    let out_dir = temp_dir("cli-pad-token-id");
    let out = out_dir.join("merged");
    let stdout = merge_ok(
        &case.join("base"),
        &case.join("adapter"),
        &out,
        &["--pad-token-id", "2"],
    );
    assert!(stdout.contains("config.json: pad_token_id: 2"), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["pad_token_id"], 2);
}
