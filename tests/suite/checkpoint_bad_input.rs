//! Malformed checkpoints and unusable destinations: each is refused with one clear line
//! naming the file and the problem, before anything is written, and nothing is left behind.

use std::path::{Path, PathBuf};

use lorakit::checkpoint::Checkpoint;
use lorakit::peft::merge_checkpoint;
use serde_json::Value;

use crate::checkpoint_merge::ckpt;
use crate::peft_common::{listing, temp_dir};

/// A copy of a fixture folder under `dir`.
fn copy_folder(from: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

fn edit_index(folder: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = folder.join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(index["weight_map"].as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string(&index).unwrap()).unwrap();
}

/// Merging `base` into `dir/out` fails with one line containing every one of `needles`,
/// writes nothing and leaves no temporary in `dir`. Returns the message.
fn refused(base: &Path, adapter: &Path, out: &Path, needles: &[&str]) -> String {
    let parent = out.ancestors().skip(1).find(|p| p.is_dir()).unwrap();
    let before = listing(parent);
    let err = merge_checkpoint(base, adapter, out, Default::default())
        .expect_err("the merge should be refused")
        .to_string();
    assert!(!err.contains('\n'), "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert_eq!(listing(parent), before, "nothing written: {err}");
    err
}

fn lora(arch: &str) -> PathBuf {
    ckpt(&format!("{arch}_adapters/lora"))
}

#[test]
fn an_index_and_shards_that_disagree_are_refused_by_name() {
    let dir = temp_dir("ckpt-bad-index");
    let out = dir.join("out");
    let src = ckpt("llama_f32_sharded");
    let first_shard = "model-00001-of-00004.safetensors";
    let second_shard = "model-00002-of-00004.safetensors";

    let moved = copy_folder(&src, &dir, "moved");
    let mut moved_name = String::new();
    edit_index(&moved, |m| {
        let (name, _) = m
            .iter()
            .find(|(_, f)| f.as_str() == Some(first_shard))
            .unwrap();
        moved_name = name.clone();
        m.insert(name.clone(), Value::from(second_shard));
    });
    refused(
        &moved,
        &lora("llama"),
        &out,
        &[&moved_name, second_shard, "does not hold it"],
    );

    let unlisted = copy_folder(&src, &dir, "unlisted");
    edit_index(&unlisted, |m| {
        m.remove("lm_head.weight");
    });
    // lm_head is alone in the last shard: its file is then never referenced.
    refused(
        &unlisted,
        &lora("llama"),
        &out,
        &[
            "lists 3 of the 4 shards",
            "model-00004-of-00004.safetensors",
        ],
    );
    let unlisted = copy_folder(&src, &dir, "unlisted2");
    edit_index(&unlisted, |m| {
        m.remove("model.embed_tokens.weight");
    });
    refused(
        &unlisted,
        &lora("llama"),
        &out,
        &["`model.embed_tokens.weight`", "the index does not list"],
    );

    let escaping = copy_folder(&src, &dir, "escaping");
    edit_index(&escaping, |m| {
        m.insert(
            "lm_head.weight".into(),
            Value::from(format!("../llama_f32_sharded/{first_shard}")),
        );
    });
    refused(&escaping, &lora("llama"), &out, &["not a plain file name"]);

    let missing = copy_folder(&src, &dir, "missing");
    std::fs::remove_file(missing.join(second_shard)).unwrap();
    refused(&missing, &lora("llama"), &out, &[second_shard]);

    let empty = copy_folder(&src, &dir, "empty");
    edit_index(&empty, |m| m.clear());
    refused(&empty, &lora("llama"), &out, &["weight_map is empty"]);

    let broken = copy_folder(&src, &dir, "broken");
    std::fs::write(
        broken.join("model.safetensors.index.json"),
        "{\"weight_map\": [",
    )
    .unwrap();
    refused(
        &broken,
        &lora("llama"),
        &out,
        &["model.safetensors.index.json", "invalid JSON at line 1"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn truncated_or_padded_shards_and_bad_headers_are_refused() {
    let dir = temp_dir("ckpt-bad-shard");
    let out = dir.join("out");
    let src = ckpt("qwen2_bf16_sharded");
    let shard = "model-00003-of-00004.safetensors";
    let bytes = std::fs::read(src.join(shard)).unwrap();

    let cut = copy_folder(&src, &dir, "cut");
    std::fs::write(cut.join(shard), &bytes[..bytes.len() - 1]).unwrap();
    refused(&cut, &lora("qwen2"), &out, &[shard, "truncated"]);

    let padded = copy_folder(&src, &dir, "padded");
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"junk");
    std::fs::write(padded.join(shard), &longer).unwrap();
    refused(&padded, &lora("qwen2"), &out, &[shard, "trailing bytes"]);

    let huge = copy_folder(&src, &dir, "huge");
    let mut header = bytes.clone();
    header[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(huge.join(shard), &header).unwrap();
    refused(&huge, &lora("qwen2"), &out, &[shard, "header length"]);

    let tiny = copy_folder(&src, &dir, "tiny");
    std::fs::write(tiny.join(shard), b"abc").unwrap();
    refused(&tiny, &lora("qwen2"), &out, &[shard, "shorter than"]);

    // Offsets that overlap: swap two tensors' data_offsets in the JSON header.
    let overlap = copy_folder(&src, &dir, "overlap");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let json = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let bad = json.replacen("\"data_offsets\":[0,", "\"data_offsets\":[2,", 1);
    assert_ne!(bad, json, "the header has a tensor at offset 0");
    let mut rewritten = bytes[..8].to_vec();
    rewritten.extend_from_slice(bad.as_bytes());
    rewritten.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(overlap.join(shard), &rewritten).unwrap();
    refused(&overlap, &lora("qwen2"), &out, &[shard, "invalid header"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn folders_without_safetensors_weights_say_what_they_hold() {
    let dir = temp_dir("ckpt-bad-folder");
    let nothing = dir.join("nothing");
    std::fs::create_dir(&nothing).unwrap();
    std::fs::write(nothing.join("config.json"), "{}").unwrap();
    let err = Checkpoint::open(&nothing).unwrap_err().to_string();
    assert!(err.contains("no model.safetensors"), "{err}");

    let torch = dir.join("torch");
    std::fs::create_dir(&torch).unwrap();
    std::fs::write(torch.join("pytorch_model.bin"), "x").unwrap();
    let err = Checkpoint::open(&torch).unwrap_err().to_string();
    assert!(err.contains("lorakit convert"), "{err}");

    let two = dir.join("two");
    std::fs::create_dir(&two).unwrap();
    for f in ["a.safetensors", "b.safetensors"] {
        std::fs::copy(ckpt("llama_f32_single/model.safetensors"), two.join(f)).unwrap();
    }
    let err = Checkpoint::open(&two).unwrap_err().to_string();
    assert!(err.contains("a.safetensors, b.safetensors"), "{err}");
    let err = Checkpoint::open(ckpt("llama_adapters/lora"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a PEFT adapter folder"), "{err}");
    // Named, either one opens.
    assert_eq!(
        Checkpoint::open(two.join("b.safetensors")).unwrap().len(),
        21
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unusable_destinations_are_refused_before_any_work() {
    let dir = temp_dir("ckpt-bad-out");
    let folder_base = ckpt("llama_f32_sharded");
    let file_base = ckpt("llama_f32_single/model.safetensors");

    let full = dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    refused(&folder_base, &lora("llama"), &full, &["not empty"]);
    assert_eq!(std::fs::read(full.join("keep.txt")).unwrap(), b"mine");

    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "mine").unwrap();
    refused(&folder_base, &lora("llama"), &a_file, &["is a file"]);

    let a_folder = dir.join("a-folder");
    std::fs::create_dir(&a_folder).unwrap();
    refused(&file_base, &lora("llama"), &a_folder, &["is a folder"]);

    refused(
        &file_base,
        &lora("llama"),
        &dir.join("no/such/out.safetensors"),
        &["does not exist"],
    );

    // The input itself, as a file or as its folder.
    let copy = copy_folder(&folder_base, &dir, "copy");
    refused(
        &copy,
        &lora("llama"),
        &copy,
        &["refusing to overwrite the input"],
    );
    let shard = copy.join("model-00001-of-00004.safetensors");
    refused(
        &shard,
        &lora("llama"),
        &shard,
        &["refusing to overwrite the input"],
    );

    #[cfg(unix)]
    {
        let err = merge_checkpoint(
            &file_base,
            &lora("llama"),
            Path::new("/dev/null"),
            Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a regular file or folder"), "{err}");
        assert!(!Path::new("/dev/null").metadata().unwrap().is_file());
    }

    // An empty folder is a valid destination for a folder output.
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    merge_checkpoint(&folder_base, &lora("llama"), &empty, Default::default()).unwrap();
    assert!(empty.join("model.safetensors.index.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_adapter_for_another_model_is_refused_before_any_work() {
    let dir = temp_dir("ckpt-bad-adapter");
    let out = dir.join("out.safetensors");
    // The fixture MLP's adapter names modules the Llama checkpoint does not have.
    refused(
        &ckpt("llama_f32_single/model.safetensors"),
        &crate::peft_common::fixture("lora_mlp/adapter"),
        &out,
        &["the adapter has module", "has no", "another model"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
