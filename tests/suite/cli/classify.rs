//! `lorakit classify`: each input's class and probabilities, and `--logits-out`, equal
//! transformers + PEFT's logits for decoder and BERT classifiers (unmerged and `--merge`d);
//! bad input is one line `error: …` and a non-zero exit, with no file left behind.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{IndexOp, Tensor};

use super::{assert_success, fails, lorakit, Arg};
use crate::peft_common::{fixture, listing, load, rel_err, temp_dir};

/// Each row of `ids` `(rows, seq)` without the slots `mask` zeroes, as `--ids` values.
fn unpadded(ids: &Tensor, mask: &Tensor) -> Vec<String> {
    let ids = ids.to_vec2::<i64>().unwrap();
    let mask = mask.to_vec2::<i64>().unwrap();
    ids.iter()
        .zip(&mask)
        .map(|(row, m)| {
            let kept: Vec<String> = row
                .iter()
                .zip(m)
                .filter(|(_, &k)| k != 0)
                .map(|(i, _)| i.to_string())
                .collect();
            kept.join(",")
        })
        .collect()
}

/// `classify --model MODEL [--adapter ADAPTER] --ids … --logits-out OUT` then `extra`.
fn classify(
    model: &Path,
    adapter: Option<&Path>,
    rows: &[String],
    out: &Path,
    extra: &[Arg],
) -> Output {
    let mut args: Vec<Arg> = vec![&"classify", &"--model", &model, &"--logits-out", &out];
    if let Some(adapter) = &adapter {
        args.extend_from_slice(&[&"--adapter", adapter]);
    }
    for row in rows {
        args.extend_from_slice(&[&"--ids", row]);
    }
    args.extend_from_slice(extra);
    lorakit(&args)
}

/// Asserts a failure with exit status 1 reported as one line `error: …` containing each
/// of `want`.
fn one_error_line(out: &Output, want: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(lines.len() == 1 && lines[0].starts_with("error: "), "{err}");
    for w in want {
        assert!(lines[0].contains(w), "`{w}` missing from {err}");
    }
}

/// The highest entry of each row of `t`.
fn argmax_rows(t: &Tensor) -> Vec<usize> {
    t.to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| (0..r.len()).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap())
        .collect()
}

#[test]
fn decoder_classes_and_logits_equal_transformers_and_peft() {
    let dir = temp_dir("cli-classify");
    // The Llama family with RoPE: a row alone gives what it gives padded on either side.
    for (case, adapter, key) in [
        ("qwen2", Some("lora"), "lora.logits"),
        ("llama", Some("dora"), "dora.logits"),
        ("llama", None, "base_logits"),
    ] {
        let root = fixture("decoder_cls").join(case);
        let io = load(&root.join("io.safetensors"));
        let rows = unpadded(&io["input_ids"], &io["attention_mask"]);
        let adapter = adapter.map(|a| root.join(a));
        for merge in [false, true] {
            if merge && adapter.is_none() {
                continue;
            }
            let out_file = dir.join(format!("{case}-{key}-{merge}.safetensors"));
            let extra: Vec<Arg> = if merge { vec![&"--merge"] } else { vec![] };
            let out = classify(
                &root.join("base"),
                adapter.as_deref(),
                &rows,
                &out_file,
                &extra,
            );
            assert_success(&out);
            let want = &io[key];
            let got = &load(&out_file)["logits"];
            let e = rel_err(got, want);
            assert!(e <= 1e-4, "{case} {key} merge={merge}: {e:.2e}");
            // One line per input: the most likely class's name, then the probabilities.
            let names = ["negative", "neutral", "positive"];
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            let classes: Vec<&str> = stdout
                .lines()
                .map(|l| l.split('\t').next().unwrap())
                .collect();
            let want_classes: Vec<&str> = argmax_rows(want).into_iter().map(|c| names[c]).collect();
            assert_eq!(classes, want_classes, "{stdout}");
            let probs: Vec<f32> = stdout
                .lines()
                .next()
                .unwrap()
                .split('\t')
                .nth(1)
                .unwrap()
                .split(' ')
                .map(|p| p.parse().unwrap())
                .collect();
            let sum: f32 = probs.iter().sum();
            assert!((sum - 1.0).abs() < 1e-3, "{stdout}");
        }
    }
    // GPT-2 (absolute positions): the full row.
    let root = fixture("decoder_cls").join("gpt2");
    let io = load(&root.join("io.safetensors"));
    let rows = unpadded(&io["input_ids"], &io["attention_mask"]);
    let out_file = dir.join("gpt2.safetensors");
    assert_success(&classify(
        &root.join("base"),
        Some(&root.join("lora")),
        &rows[..1],
        &out_file,
        &[],
    ));
    let got = load(&out_file)["logits"].clone();
    let e = rel_err(&got, &io["lora.logits"].i(0..1).unwrap());
    assert!(e <= 1e-4, "gpt2: {e:.2e}");
}

#[test]
fn bert_logits_equal_peft() {
    let root = fixture("peft_options").join("bert_cls");
    let io = load(&root.join("io.safetensors"));
    let ids = &io["input_ids"];
    let rows = unpadded(ids, &ids.ones_like().unwrap());
    let dir = temp_dir("cli-classify-bert");
    let out_file = dir.join("bert.safetensors");
    let out = classify(
        &root.join("base"),
        Some(&root.join("adapter")),
        &rows,
        &out_file,
        &[],
    );
    assert_success(&out);
    let e = rel_err(&load(&out_file)["logits"], &io["logits"]);
    assert!(e <= 1e-4, "bert: {e:.2e}");
}

#[test]
fn bad_classify_input_is_one_line_and_leaves_no_file() {
    let root = fixture("decoder_cls").join("qwen2");
    let base: PathBuf = root.join("base");
    let dir = temp_dir("cli-classify-bad");
    let out_file = dir.join("logits.safetensors");
    let ids = vec!["1,2,99".to_string()];
    // An id past the vocabulary: named, exit 1, no logits file.
    let out = classify(&base, None, &ids, &out_file, &[]);
    one_error_line(&out, &["input_ids", "99"]);
    // No tokenizer.json for --text.
    let out = lorakit(&[&"classify", &"--model", &base, &"--text", &"hello"]);
    one_error_line(&out, &["tokenizer.json", "--ids"]);
    // Usage errors exit 2.
    for args in [
        vec!["classify", "--model", "x", "--ids", "1,x"],
        vec![
            "classify",
            "--model",
            "x",
            "--text",
            "a",
            "--text",
            "b",
            "--text-pair",
            "c",
        ],
        vec![
            "classify",
            "--model",
            "x",
            "--ids",
            "1",
            "--num-labels",
            "0",
        ],
        vec!["classify", "--model", "x"],
    ] {
        let out = lorakit(&args.iter().map(|a| a as Arg).collect::<Vec<_>>());
        let err = fails(out.clone());
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    }
    // A head of another number of classes than --num-labels is named.
    let ok = vec!["1,2,3".to_string()];
    let out = classify(&base, None, &ok, &out_file, &[&"--num-labels", &"2"]);
    one_error_line(&out, &["score", "num_labels"]);
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
}

/// A head-less checkpoint (GPT-2 causal LM) and a 3-label `SEQ_CLS` adapter trained from
/// it: without `--num-labels` the config's default 2 classes do not fit the head, and the
/// error says what to pass; with it the logits are PEFT's; `merge` writes a classifier
/// folder (its config.json says so) that `classify` takes alone, giving PEFT's logits.
#[test]
fn a_headless_base_takes_num_labels_and_merges_into_a_classifier() {
    let root = fixture("merged_head").join("gpt2");
    let (base, adapter) = (root.join("base"), root.join("adapter"));
    let io = load(&root.join("io.safetensors"));
    let ids = &io["input_ids"];
    let rows = unpadded(ids, &ids.ones_like().unwrap());
    let dir = temp_dir("cli-classify-headless");
    let out_file = dir.join("logits.safetensors");
    let out = classify(&base, Some(&adapter), &rows, &out_file, &[]);
    one_error_line(&out, &["score", "--num-labels 3"]);
    assert!(!out_file.exists());
    let out = classify(
        &base,
        Some(&adapter),
        &rows,
        &out_file,
        &[&"--num-labels", &"3"],
    );
    assert_success(&out);
    assert!(rel_err(&load(&out_file)["logits"], &io["logits"]) <= 1e-4);

    let merged = dir.join("merged");
    let out = super::merge(&base, &adapter, &merged);
    assert_success(&out);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(
            "config.json: architectures: GPT2LMHeadModel -> GPT2ForSequenceClassification"
        ),
        "{summary}"
    );
    let merged_file = dir.join("merged.safetensors");
    let out = classify(&merged, None, &rows, &merged_file, &[]);
    assert_success(&out);
    assert!(rel_err(&load(&merged_file)["logits"], &io["logits"]) <= 1e-4);
}
