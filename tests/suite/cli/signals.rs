//! Signals: a merge stopped by SIGINT or SIGTERM removes its temporaries and exits 130; a
//! second signal stops it at once. (Unix only: `mod signals` is `#[cfg(unix)]`.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{bin, lora_mlp_folders, merge_args, wait_at_most};
use crate::peft_common::{fixture, listing, temp_dir};

/// Starts a merge that waits `LORAKIT_TEST_TENSOR_DELAY_MS` (a test-only hook of the
/// binary) after each tensor, so that it is surely still running when signalled.
fn slow_merge(base: &Path, out: &Path, ignore_first_signal: bool) -> Child {
    let mut cmd = bin();
    cmd.args(merge_args(
        base,
        &fixture("lora_mlp").join("adapter"),
        out,
        &[],
    ))
    .env("LORAKIT_TEST_TENSOR_DELAY_MS", "60000")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if ignore_first_signal {
        cmd.env("LORAKIT_TEST_DELAY_IGNORES_SIGNALS", "1");
    }
    cmd.spawn().expect("run lorakit")
}

/// Waits until the merge's temporary for `out` exists (the merge is writing).
fn wait_for_temporary(child: &mut Child, out: &Path) -> PathBuf {
    let name = out.file_name().unwrap().to_string_lossy();
    let prefix = format!(".{name}.tmp{}.", child.id());
    let dir = out.parent().unwrap();
    let start = Instant::now();
    loop {
        if let Some(n) = listing(dir).into_iter().find(|n| n.starts_with(&prefix)) {
            return dir.join(n);
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the merge ended ({status}) before writing");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no temporary appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn send(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(ok.success());
}

/// Signals a slow merge into `out` once it writes, and checks that it stopped cleanly.
fn interrupt(base: &Path, out: &Path, signal: &str) {
    let dir = out.parent().unwrap();
    let before = listing(dir);
    let mut child = slow_merge(base, out, false);
    let tmp = wait_for_temporary(&mut child, out);
    send(&child, signal);
    let status = wait_at_most(&mut child, Duration::from_secs(60));
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(status.code(), Some(130), "{signal}: {err}");
    assert!(
        err.ends_with("interrupted; nothing was written\n"),
        "{signal}: {err}"
    );
    assert!(!tmp.exists(), "{signal}: {} left behind", tmp.display());
    assert_eq!(listing(dir), before, "{signal}");
}

#[test]
fn sigterm_or_sigint_during_a_merge_removes_its_temporaries() {
    let tmp = temp_dir("cli-signal");
    let (_, sharded) = lora_mlp_folders(&tmp);
    let outs = tmp.join("outs");
    std::fs::create_dir_all(&outs).unwrap();
    interrupt(
        &fixture("lora_mlp").join("base.safetensors"),
        &outs.join("merged.safetensors"),
        "TERM",
    );
    interrupt(&sharded, &outs.join("merged"), "TERM");
    interrupt(&sharded, &outs.join("merged"), "INT");
}

/// A second signal does not wait for the current tensor: it removes the temporaries and
/// exits at once.
#[test]
fn a_second_signal_stops_at_once() {
    use std::io::BufRead;
    let tmp = temp_dir("cli-signal-twice");
    let (_, sharded) = lora_mlp_folders(&tmp);
    let out = tmp.join("merged");
    let before = listing(&tmp);
    let mut child = slow_merge(&sharded, &out, true);
    let staged = wait_for_temporary(&mut child, &out);
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    send(&child, "TERM");
    let note = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a note on the first signal");
    assert!(note.contains("stopping after the current tensor"), "{note}");
    send(&child, "TERM");
    let status = wait_at_most(&mut child, Duration::from_secs(50));
    assert_eq!(status.code(), Some(130));
    assert!(
        start.elapsed() < Duration::from_secs(55),
        "it waited for the tensor"
    );
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(rest, ["interrupted; nothing was written"]);
    assert!(!staged.exists(), "{} left behind", staged.display());
    assert_eq!(listing(&tmp), before);
}
