//! Leftovers of a killed run: temporaries of a dead process are reported, and removed on
//! request; a live process's temporaries and other files are left alone.

use std::path::Path;

use super::{merge, merge_with};
use crate::peft_common::{fixture, listing, temp_dir};

/// A PID no running process has (on Linux; elsewhere liveness is not checked).
fn dead_pid() -> u32 {
    (999_999..)
        .find(|p| !Path::new("/proc").join(p.to_string()).exists())
        .unwrap()
}

#[test]
fn leftovers_are_reported_and_removed_on_request() {
    let tmp = temp_dir("cli-leftovers");
    let base = fixture("lora_mlp").join("base.safetensors");
    let adapter = fixture("lora_mlp").join("adapter");
    let out = tmp.join("merged.safetensors");
    let dead = format!(".merged.safetensors.tmp{}.0", dead_pid());
    std::fs::write(tmp.join(&dead), "half a file").unwrap();
    // A temporary of a live process (this one) is not a leftover: another merge's.
    let live = format!(".merged.safetensors.tmp{}.7", std::process::id());
    std::fs::write(tmp.join(&live), "in progress").unwrap();
    // Not a temporary of this destination.
    let other = format!(".other.safetensors.tmp{}.0", dead_pid());
    std::fs::write(tmp.join(&other), "someone else's").unwrap();

    let res = merge(&base, &adapter, &out);
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("warning: ") && lines[0].contains(&dead),
        "{err}"
    );
    assert!(lines[0].contains("--remove-leftovers"), "{err}");
    assert!(tmp.join(&dead).exists(), "only reported without the flag");
    assert!(out.is_file());

    let res = merge_with(&base, &adapter, &out, &["--remove-leftovers"]);
    let err = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{err}");
    assert!(
        err.starts_with("warning: removed") && err.contains(&dead),
        "{err}"
    );
    assert_eq!(
        listing(&tmp),
        [live.as_str(), other.as_str(), "merged.safetensors"]
    );
}
