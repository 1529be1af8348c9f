//! Replays the fuzz targets' bodies (`fuzz/src/exercise.rs`, shared with the fuzzer) on
//! the inputs in `tests/fixtures/fuzz/<target>/`: the hand-made nasty inputs written by
//! `make_inputs.py` and every input the fuzzer found a bug with. Each must return (no
//! panic, no unbounded allocation); the table below says which error each must give.

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
            (
                "base_wrong_shape.bin",
                &["lin0", "lora_A.weight", "[20, 11]"],
            ),
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
