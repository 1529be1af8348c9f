//! Replays the fuzz targets' bodies (`fuzz/src/exercise.rs`, shared with the fuzzer) on
//! the inputs in `tests/fixtures/fuzz/<target>/`: the hand-made nasty inputs written by
//! `make_inputs.py` and every input the fuzzer found a bug with. Each must return (no
//! panic, no unbounded allocation); the table below says which error each must give.
//!
//! The checkpoint targets (`checkpoint_folder`, `checkpoint_file`) keep their seeds in
//! `fuzz/corpus/<target>/` and their hand-made and found inputs in
//! `fuzz/regressions/<target>/` (both written by `fuzz/make_seeds.py`); both are replayed.

#[path = "../../fuzz/src/exercise.rs"]
mod exercise;

use std::path::PathBuf;

fn dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/fuzz/{target}"))
}

fn input(target: &str, name: &str) -> Vec<u8> {
    let path = dir(target).join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts `result` is an error whose message contains every one of `needles`.
fn assert_err<T: std::fmt::Debug>(name: &str, result: lorakit::Result<T>, needles: &[&str]) {
    match result {
        Ok(v) => panic!("{name}: expected an error containing {needles:?}, got Ok({v:?})"),
        Err(e) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{name}: error `{msg}` lacks `{n}`");
            }
        }
    }
}

/// Runs `run` on every file of `target`'s directory (each must return, Ok or Err), then
/// checks the listed files' errors.
fn replay_all<T: std::fmt::Debug>(
    target: &str,
    run: fn(&[u8]) -> lorakit::Result<T>,
    expected: &[(&str, &[&str])],
) {
    let mut names: Vec<String> = std::fs::read_dir(dir(target))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in &names {
        let _ = run(&input(target, name)); // must not panic
    }
    for (name, needles) in expected {
        assert!(names.iter().any(|n| n == name), "missing input {name}");
        assert_err(name, run(&input(target, name)), needles);
    }
}

#[test]
fn config_json_inputs_return_errors_naming_the_problem() {
    replay_all(
        "config_json",
        exercise::config_json,
        &[
            ("r_zero.json", &["`r`", "between 1 and 65536, got 0"]),
            ("r_huge.json", &["`r`", "got 1000000000000"]),
            ("r_negative.json", &["`r`", "non-negative integer, got -1"]),
            ("r_string.json", &["`r`", "got \"8\""]),
            ("alpha_negative.json", &["fc", "lora_alpha", "got -8"]),
            ("alpha_string.json", &["`lora_alpha`", "expected a number"]),
            ("dropout_above_one.json", &["fc", "dropout", "got 1.5"]),
            ("init_r_huge.json", &["`init_r`", "got 1000000000000"]),
            (
                "rank_pattern_huge.json",
                &["`rank_pattern`", "`fc`", "got 99999999"],
            ),
            ("targets_number.json", &["`target_modules`", "got 5"]),
            (
                "targets_bad_regex.json",
                &["`target_modules`", "(fc", "does not compile"],
            ),
            ("truncated.json", &["adapter_config.json", "invalid JSON"]),
            ("top_level_array.json", &["expected a JSON object"]),
        ],
    );
}

#[test]
fn load_adapter_inputs_return_errors_naming_the_problem() {
    exercise::load_adapter(&input("load_adapter", "valid.bin")).unwrap();
    replay_all(
        "load_adapter",
        exercise::load_adapter,
        &[
            ("truncated_safetensors.bin", &["adapter_model.safetensors"]),
            ("huge_shape.bin", &["adapter_model.safetensors"]),
            ("shape_overflow.bin", &["adapter_model.safetensors"]),
            ("huge_header_length.bin", &["adapter_model.safetensors"]),
            ("config_r_huge.bin", &["`r`", "got 1000000000000"]),
            (
                "adalora_init_r_huge.bin",
                &["`init_r`", "got 1000000000000"],
            ),
            (
                "rank_mismatch.bin",
                &[
                    "fc",
                    "base_model.model.fc.lora_A.weight",
                    "[2, 2]",
                    "[1, 2]",
                ],
            ),
            (
                "vera_without_projections.bin",
                &["base_model.vera_A", "adapter_model.safetensors"],
            ),
        ],
    );
}

#[test]
fn merge_corrupted_inputs_return_errors_and_leave_the_output_untouched() {
    // `exercise::merge_corrupted` itself asserts the previous output survives a failed
    // merge and that no temporary file is left.
    replay_all(
        "merge_corrupted",
        exercise::merge_corrupted,
        &[
            (
                "base_truncated.bin",
                &["base.safetensors", "safetensors error"],
            ),
            (
                "adapter_truncated.bin",
                &["adapter_model.safetensors", "safetensors error"],
            ),
            ("config_empty.bin", &["adapter_config.json", "invalid JSON"]),
            (
                "base_int_weight.bin",
                &["base weight dtype", "lin0.weight", "I64"],
            ),
            ("base_wrong_shape.bin", &["lin0", "[20, 11]"]),
            (
                "base_huge_shape.bin",
                &["base.safetensors", "safetensors error"],
            ),
        ],
    );
}

#[test]
fn the_fuzz_seed_corpora_load_and_merge() {
    // The seeds are PEFT's fixtures: each must succeed, so the fuzzer starts from inputs
    // that reach deep into the code.
    for target in ["config_json", "load_adapter", "merge_corrupted"] {
        let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/corpus/{target}"));
        for entry in std::fs::read_dir(&seeds).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let ok = match target {
                "config_json" => exercise::config_json(&data).map(|_| ()),
                "load_adapter" => exercise::load_adapter(&data),
                _ => exercise::merge_corrupted(&data).map(|_| ()),
            };
            if let Err(e) = ok {
                // VeRA and AdaLoRA have no fresh plan in `config_json`; all else must pass.
                let unsupported = e.to_string().contains("fresh adapter type");
                assert!(unsupported, "{}: {e}", path.display());
            }
        }
    }
}

/// A checkpoint target's input: `fuzz/corpus/<target>/<name>` (a seed) or
/// `fuzz/regressions/<target>/<name>` (hand-made or found by the fuzzer).
fn checkpoint_input(target: &str, name: &str) -> Vec<u8> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seed = root.join(format!("corpus/{target}/{name}"));
    let path = if seed.exists() {
        seed
    } else {
        root.join(format!("regressions/{target}/{name}"))
    };
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `run` on every seed and regression input of `target` (each must return, Ok or Err:
/// the target itself asserts the invariants), then checks the listed ones: an empty list of
/// needles means the input must merge, otherwise its error must contain every needle.
fn replay_checkpoint_target(
    target: &str,
    run: fn(&[u8]) -> lorakit::Result<lorakit::peft::MergeReport>,
    expected: &[(&str, &[&str])],
) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut names = Vec::new();
    for kind in ["corpus", "regressions"] {
        for entry in std::fs::read_dir(root.join(format!("{kind}/{target}"))).unwrap() {
            names.push(entry.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert!(names.len() >= 10, "{target}: {} inputs", names.len());
    for name in &names {
        let result = run(&checkpoint_input(target, name)); // must not panic
        if let Some((_, needles)) = expected.iter().find(|(n, _)| n == name) {
            match (needles.is_empty(), result) {
                (true, Ok(report)) => {
                    assert_eq!(report.merged, ["model.layers.0.self_attn.q_proj"], "{name}")
                }
                (true, Err(e)) => panic!("{target}/{name}: expected a merge, got `{e}`"),
                (false, result) => assert_err(name, result, needles),
            }
        }
    }
    for (name, _) in expected {
        assert!(
            names.iter().any(|n| n == name),
            "missing input {target}/{name}"
        );
    }
}

const INDEX: &str = "model.safetensors.index.json";
const SHARD_2: &str = "model-00002-of-00002.safetensors";

#[test]
fn checkpoint_folder_inputs_merge_or_name_the_problem() {
    // `exercise::checkpoint_folder` asserts the output (shards, tensors, index, copied
    // files) on success, and on failure that the output and inputs are untouched and no
    // temporary is left.
    replay_checkpoint_target(
        "checkpoint_folder",
        exercise::checkpoint_folder,
        &[
            ("f32_keep_lora", &[]),
            ("f32_to_bf16_dora", &[]),
            ("bf16_to_f32_via_index_out_dir", &[]),
            ("f32_to_f16_leftover_kept", &[]),
            ("bf16_dora_leftover_removed", &[]),
            ("mixed_dtypes_to_bf16", &[]),
            ("other_model_config", &[]),
            ("no_index_one_file", &[]),
            ("metadata_not_object.bin", &[]),
            ("index_without_metadata.bin", &[]),
            // Two tensors in a shard named `config.json`: written merged, not replaced by a
            // copy of the input file (it once was: `companion_files` listed it).
            ("shard_named_config_json.bin", &[]),
            // total_size counts a 4-bit tensor's 3 bytes (it once counted 0).
            ("f4_tensor.bin", &[]),
            // One name announcing 99,999,999,999 shards: three missing names are listed, not
            // all of them (it once allocated one name per shard until the process aborted).
            (
                "announced_shards_huge.bin",
                &[
                    INDEX,
                    "lists 1 of the 99999999999 shards",
                    "model-00004-of-99999999999",
                ],
            ),
            (
                "no_index_two_files",
                &["several candidate checkpoints", "model-00001-of-00002"],
            ),
            (
                "moved_tensor",
                &[
                    INDEX,
                    "`model.layers.0.self_attn.k_proj.weight`",
                    "does not hold it",
                ],
            ),
            (
                "unlisted_tensor",
                &[INDEX, SHARD_2, "`model.norm.weight`", "does not list"],
            ),
            (
                "listed_not_held",
                &[INDEX, "`lm_head.weight`", SHARD_2, "does not hold it"],
            ),
            (
                "dotdot_shard",
                &[INDEX, "`../model-00002-of-00002.safetensors`"],
            ),
            (
                "absolute_shard.bin",
                &[INDEX, "`/etc/passwd`", "not a plain file name"],
            ),
            (
                "one_of_two_shards",
                &[INDEX, "lists 1 of the 2 shards", SHARD_2],
            ),
            ("weight_map_missing", &[INDEX, "no `weight_map`"]),
            ("weight_map_empty.bin", &[INDEX, "weight_map is empty"]),
            (
                "weight_map_not_string.bin",
                &[INDEX, "`w` is not a file name"],
            ),
            ("index_not_object.bin", &[INDEX, "not a JSON object"]),
            ("truncated_shard", &[SHARD_2, "576 data bytes", "holds 571"]),
            (
                "trailing_bytes_shard",
                &[SHARD_2, "576 data bytes", "holds 584"],
            ),
        ],
    );
}

#[test]
fn checkpoint_file_inputs_merge_or_name_the_problem() {
    replay_checkpoint_target(
        "checkpoint_file",
        exercise::checkpoint_file,
        &[
            ("f32_keep_lora", &[]),
            ("f32_to_bf16_dora", &[]),
            ("bf16_to_f32_no_previous", &[]),
            ("f32_to_f16_leftover_kept", &[]),
            ("bf16_dora_leftover_removed", &[]),
            ("mixed_dtypes_to_bf16", &[]),
            ("no_metadata", &[]),
            ("f4_tensor.bin", &[]),
            // Eight tensors declaring 2^64 - 8 bytes in all: the header's end plus that
            // length overflows (it once panicked in debug builds).
            (
                "data_len_overflow.bin",
                &["model.safetensors", "18446744073709551608 data bytes"],
            ),
            // A zero-element [0, 2^33, 2^33] tensor, whose strides overflow in candle (it once
            // panicked in candle-core's shape.rs, from `Checkpoint::load`, in debug builds).
            (
                "zero_elements_huge_dims.bin",
                &["model.safetensors", "`z`", "too large to address"],
            ),
            (
                "truncated",
                &["model.safetensors", "1664 data bytes", "holds 1659"],
            ),
            (
                "trailing_bytes",
                &["model.safetensors", "1664 data bytes", "holds 1672"],
            ),
            (
                "header_past_end",
                &["model.safetensors", "runs past the end"],
            ),
            ("offsets_gap", &["model.safetensors", "invalid offset"]),
            (
                "huge_header_length.bin",
                &["model.safetensors", "exceeds the 100000000-byte limit"],
            ),
            (
                "short_file.bin",
                &["model.safetensors", "shorter than the 8-byte header length"],
            ),
            (
                "target_3d.bin",
                &[
                    "`model.layers.0.self_attn.q_proj.weight`",
                    "[1, 16, 16]",
                    "2-D",
                ],
            ),
            ("target_wrong_dtype.bin", &["base weight dtype", "I32"]),
            ("target_wrong_shape.bin", &["q_proj", "[16, 8]"]),
        ],
    );
}
