//! Outputs a merge refuses before any work: its own inputs, a non-empty folder, a file where
//! a folder goes and the reverse, a missing folder, a fifo, `/dev/null`.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use super::{bin, fails, lora_mlp_folders, merge, merge_args, one_error_line, wait_at_most};
use crate::peft_common::{fixture, listing, temp_dir};

#[test]
fn refuses_to_overwrite_inputs() {
    let tmp = temp_dir("cli-overwrite");
    let base = tmp.join("base.safetensors");
    std::fs::copy(fixture("lora_mlp").join("base.safetensors"), &base).unwrap();
    let before = std::fs::read(&base).unwrap();
    let adapter = fixture("lora_mlp").join("adapter");
    let err = fails(merge(&base, &adapter, &base));
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(&base).unwrap(), before);
    let weights = adapter.join("adapter_model.safetensors");
    let err = fails(merge(&base, &adapter, &weights));
    assert!(err.contains("refusing to overwrite"), "{err}");
}

/// Merges lora_mlp's adapter into `base`, writing `out`; kills it and fails the test if it
/// runs past a minute (a command that opened a fifo for writing would wait for a reader
/// forever).
fn merge_within_a_minute(base: &Path, out: &Path) -> Output {
    let adapter = fixture("lora_mlp").join("adapter");
    let mut child = bin()
        .args(merge_args(base, &adapter, out, &[]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lorakit");
    wait_at_most(&mut child, Duration::from_secs(60));
    child.wait_with_output().unwrap()
}

/// A merge into `out` that must be refused before any work: one error line with `want`,
/// and `out`'s folder exactly as before (no temporary, no output).
fn refused(base: &Path, out: &Path, want: &str) {
    let dir = out.ancestors().skip(1).find(|d| d.is_dir()).unwrap();
    let before = listing(dir);
    one_error_line(&merge_within_a_minute(base, out), &[want]);
    assert_eq!(
        listing(dir),
        before,
        "{}: something was left",
        out.display()
    );
}

#[test]
fn outputs_that_cannot_be_written_are_refused_before_any_work() {
    let tmp = temp_dir("cli-refuse");
    let (single, sharded) = lora_mlp_folders(&tmp);
    let file_base = single.join("model.safetensors");
    let outs = tmp.join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    // A folder output needs an absent or empty folder.
    let full = outs.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    refused(&sharded, &full, "the output folder exists and is not empty");
    assert_eq!(
        std::fs::read_to_string(full.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(listing(&full), ["keep.txt"]);
    let file = outs.join("a-file");
    std::fs::write(&file, "mine").unwrap();
    refused(&sharded, &file, "is a file, but the output is a folder");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    // A file output cannot replace a folder.
    let empty = outs.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(
        &file_base,
        &empty,
        "is a folder, but the output is a single file",
    );
    // The inputs themselves.
    refused(&file_base, &file_base, "refusing to overwrite the input");
    refused(&sharded, &sharded, "refusing to overwrite the input");
    refused(
        &sharded.join("model.safetensors.index.json"),
        &sharded,
        "refusing to overwrite the input",
    );
    // A folder that does not exist.
    refused(
        &file_base,
        &outs.join("nope").join("m.safetensors"),
        "does not exist",
    );
    // A fifo: never opened (that would wait for a reader forever).
    #[cfg(unix)]
    {
        let fifo = outs.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            refused(
                &file_base,
                &fifo,
                "is not a regular file or folder (a device, fifo or socket)",
            );
            refused(&sharded, &fifo, "is not a regular file or folder");
            use std::os::unix::fs::FileTypeExt;
            assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        } else {
            eprintln!("skipped: mkfifo failed");
        }
    }
}

/// `--out /dev/null`: a character device is never replaced (nor written to).
#[cfg(unix)]
#[test]
fn dev_null_is_refused() {
    use std::os::unix::fs::FileTypeExt;
    let dev_null = Path::new("/dev/null");
    if !std::fs::metadata(dev_null).is_ok_and(|m| m.file_type().is_char_device()) {
        eprintln!("skipped: no /dev/null character device");
        return;
    }
    let res = merge_within_a_minute(&fixture("lora_mlp").join("base.safetensors"), dev_null);
    one_error_line(
        &res,
        &[
            "/dev/null",
            "not a regular file or folder",
            "refusing to replace it",
        ],
    );
    assert!(std::fs::metadata(dev_null)
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(!Path::new("/dev/.null.tmp").exists());
}
