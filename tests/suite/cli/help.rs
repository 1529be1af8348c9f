//! Help for every command, `--version`, usage errors (exit 2), and a closed stdout.

use std::path::Path;

use super::{bin, lorakit, merge_with, run};
use crate::peft_common::fixture;

#[test]
fn help_for_every_command_and_version() {
    for (args, usage) in [
        (vec!["--help"], "Usage: lorakit <COMMAND>"),
        (vec!["help"], "Usage: lorakit <COMMAND>"),
        (vec!["-h"], "Usage: lorakit <COMMAND>"),
        (
            vec!["merge", "--help"],
            "Usage: lorakit merge [OPTIONS] --base <CHECKPOINT> --adapter <DIR> --out <PATH>",
        ),
        (vec!["merge", "-h"], "Usage: lorakit merge"),
        (vec!["help", "merge"], "Usage: lorakit merge"),
        (
            vec!["inspect", "--help"],
            "Usage: lorakit inspect [OPTIONS] <ADAPTER_DIR>",
        ),
        (vec!["inspect", "-h"], "Usage: lorakit inspect"),
    ] {
        let out = run(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {:?}", out.status);
        assert!(text.contains(usage), "{args:?}: {text}");
    }
    let text = String::from_utf8_lossy(&lorakit(&[&"merge", &"--help"]).stdout).into_owned();
    for flag in [
        "--dtype <DTYPE>",
        "keep, f32, f16, bf16",
        "--quiet",
        "--remove-leftovers",
    ] {
        assert!(text.contains(flag), "merge --help lacks {flag}: {text}");
    }
    let text = String::from_utf8_lossy(&lorakit(&[&"inspect", &"--help"]).stdout).into_owned();
    assert!(text.contains("--base <CHECKPOINT>"), "{text}");
    let out = lorakit(&[&"--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("lorakit {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2() {
    let adapter = fixture("lora_mlp").join("adapter");
    for args in [
        vec![],
        vec![
            "merge",
            "--base",
            "b.safetensors",
            "--adapter",
            "a",
            "--out",
            "o",
            "--dtype",
            "f8",
        ],
        vec!["merge", "--base", "b.safetensors", "--adapter", "a"],
        vec!["inspect"],
        vec!["inspect", adapter.to_str().unwrap(), "extra"],
        vec!["merge", "--frobnicate"],
    ] {
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("Usage: lorakit") || err.contains("try '--help'"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let (b, a, o) = (Path::new("b"), Path::new("a"), Path::new("o"));
    let err = String::from_utf8_lossy(&merge_with(b, a, o, &["--dtype", "f8"]).stderr).into_owned();
    assert!(
        err.contains("possible values: keep, f32, f16, bf16"),
        "{err}"
    );
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    // The reader is gone before the command writes (`lorakit inspect dir | head`).
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let adapter = fixture("lora_mlp").join("adapter");
    for args in [vec!["inspect", adapter.to_str().unwrap()], vec!["--help"]] {
        let out = bin()
            .args(&args)
            .stdout(writer.try_clone().expect("the pipe's writer"))
            .output()
            .expect("run lorakit");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {err}", out.status);
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}
