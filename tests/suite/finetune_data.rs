//! `lorakit::finetune::{data, batching}`: JSONL examples checked against transformers'
//! tokenization (tests/fixtures/finetune_data/, scripts/make_finetune_data_fixture.py),
//! every bad input named by file and line, and the batches' layout, masks and determinism.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::Device;
use lorakit::finetune::batching::{Batch, BatchOptions, Packing};
use lorakit::finetune::data::{tiny_tokenizer, Dataset, Example};
use lorakit::tokenizer::TextTokenizer;
use proptest::prelude::*;
use serde_json::Value;

use crate::bad_input_common::Checker;

const TOKENIZER: &str = "tests/fixtures/tokenizer";
const DATA: &str = "tests/fixtures/finetune_data";

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_dir(TOKENIZER).unwrap()
}

fn read_json(path: impl AsRef<Path>) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_bool().unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading examples.
// ---------------------------------------------------------------------------------------

#[test]
fn jsonl_examples_equal_transformers_encodings() {
    let tok = tokenizer();
    let data = Dataset::from_jsonl(Path::new(DATA).join("mixed.jsonl"), &tok).unwrap();
    let expected = read_json(Path::new(DATA).join("expected.json"));
    let expected = expected.as_array().unwrap();
    assert_eq!(data.len(), expected.len());
    for (example, want) in data.examples().iter().zip(expected) {
        let line = &want["line"];
        assert_eq!(example.ids, u32s(&want["ids"]), "line {line}: ids");
        assert_eq!(
            example.trained,
            bools(&want["trained"]),
            "line {line}: trained"
        );
    }
    // The file's lines are remembered: id 61 (`▁3`) first appears in line 5 ("sort: 3 1 2"),
    // the fourth example, at token 6.
    let err = data.check_vocab(61).unwrap_err().to_string();
    assert!(err.contains("mixed.jsonl: line 5: token 6: id 61"), "{err}");
    data.check_vocab(tok.vocab_size()).unwrap();
    assert_eq!(
        data.total_tokens(),
        expected
            .iter()
            .map(|e| e["ids"].as_array().unwrap().len())
            .sum::<usize>()
    );
}

#[test]
fn text_examples_are_the_tokenizer_fixture_encodings_plus_eos() {
    // tests/fixtures/tokenizer/expected.json holds transformers' `tok(text)["input_ids"]`.
    let tok = tokenizer();
    let cases = read_json(Path::new(TOKENIZER).join("expected.json"));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ex = Example::text(&tok, text).unwrap();
        let mut want = u32s(&case["ids"]);
        want.push(2);
        assert_eq!(ex.ids, want, "{text:?}");
        assert!(ex.trained.iter().all(|&t| t), "{text:?}");
        assert_eq!(ex.target_count(), want.len() - 1);
    }
}

#[test]
fn prompt_tokens_are_masked_and_completion_trained() {
    let tok = tokenizer();
    let cases = read_json(Path::new(TOKENIZER).join("expected.json"));
    let case = |i: usize| &cases["cases"][i];
    // "hello world" as prompt, "the lazy fox" as completion.
    let (prompt, completion) = (case(0), case(1));
    let ex = Example::prompt_completion(
        &tok,
        prompt["text"].as_str().unwrap(),
        completion["text"].as_str().unwrap(),
    )
    .unwrap();
    let p = u32s(&prompt["ids"]);
    let c = u32s(&completion["ids_no_special"]);
    let want: Vec<u32> = p.iter().chain(&c).copied().chain([2]).collect();
    assert_eq!(ex.ids, want);
    let flags: Vec<bool> = (0..want.len()).map(|i| i >= p.len()).collect();
    assert_eq!(ex.trained, flags);
    assert_eq!(ex.target_count(), c.len() + 1);
}

#[test]
fn example_new_and_counts() {
    let ex = Example::new(vec![1, 2, 3, 4], vec![true, false, true, true]).unwrap();
    assert_eq!((ex.len(), ex.is_empty(), ex.target_count()), (4, false, 2));
    // Position 0 is never a target.
    assert_eq!(Example::new(vec![9], vec![true]).unwrap().target_count(), 0);
}

// ---------------------------------------------------------------------------------------
// Bad input.
// ---------------------------------------------------------------------------------------

/// Writes `body` as `name` in `dir`.
fn file(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

fn bare_tokenizer() -> TextTokenizer {
    let mut inner =
        tokenizers::Tokenizer::from_file(Path::new(TOKENIZER).join("tokenizer.json")).unwrap();
    inner.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
    TextTokenizer::from_tokenizer(inner, "bare")
}

#[test]
fn every_bad_jsonl_line_is_named_by_file_and_line() {
    let scratch = crate::peft_common::temp_dir("finetune-data");
    let tok = tokenizer();
    let bare = bare_tokenizer();
    let mut c = Checker::new();
    // (file name, third line, words the message must hold besides the file and "line 3").
    let cases: &[(&str, &str, &[&str])] = &[
        ("json.jsonl", r#"{"text": "x""#, &["invalid JSON at line 3"]),
        (
            "json_trailing.jsonl",
            r#"{"text": "x"} 7"#,
            &["invalid JSON at line 3"],
        ),
        (
            "array.jsonl",
            "[1, 2]",
            &["expected a JSON object, got an array"],
        ),
        ("string.jsonl", r#""text""#, &["JSON object, got a string"]),
        ("neither.jsonl", r#"{"txt": "x"}"#, &["no `text`"]),
        ("empty_object.jsonl", "{}", &["no `text`"]),
        (
            "both.jsonl",
            r#"{"text": "a", "prompt": "b", "completion": "c"}"#,
            &["`text` and `prompt`/`completion`", "one form per line"],
        ),
        (
            "text_and_ids.jsonl",
            r#"{"text": "a", "input_ids": [1]}"#,
            &["`text` and `input_ids`"],
        ),
        (
            "no_completion.jsonl",
            r#"{"prompt": "a"}"#,
            &["`completion` is missing"],
        ),
        (
            "no_prompt.jsonl",
            r#"{"completion": "a"}"#,
            &["`prompt` is missing"],
        ),
        (
            "text_number.jsonl",
            r#"{"text": 5}"#,
            &["`text` must be a string, got a number"],
        ),
        (
            "text_null.jsonl",
            r#"{"text": null}"#,
            &["`text` must be a string, got null"],
        ),
        (
            "prompt_array.jsonl",
            r#"{"prompt": ["a"], "completion": "b"}"#,
            &["`prompt` must be a string, got an array"],
        ),
        (
            "completion_object.jsonl",
            r#"{"prompt": "a", "completion": {}}"#,
            &["`completion` must be a string, got an object"],
        ),
        (
            "ids_string.jsonl",
            r#"{"input_ids": "1 2"}"#,
            &["`input_ids` must be an array"],
        ),
        (
            "ids_negative.jsonl",
            r#"{"input_ids": [1, -4]}"#,
            &["`input_ids`[1]", "-4"],
        ),
        (
            "ids_float.jsonl",
            r#"{"input_ids": [1.5]}"#,
            &["`input_ids`[0]"],
        ),
        (
            "ids_huge.jsonl",
            r#"{"input_ids": [4294967296]}"#,
            &["`input_ids`[0]"],
        ),
        ("ids_empty.jsonl", r#"{"input_ids": []}"#, &["no tokens"]),
        (
            "mask_length.jsonl",
            r#"{"input_ids": [1, 2], "trained": [true, true, false]}"#,
            &["2 token ids but 3 trained flags"],
        ),
        (
            "mask_type.jsonl",
            r#"{"input_ids": [1, 2], "labels_mask": [1, 0]}"#,
            &["`labels_mask`[0] must be true or false"],
        ),
        (
            "mask_twice.jsonl",
            r#"{"input_ids": [1], "trained": [true], "labels_mask": [true]}"#,
            &["both `trained` and `labels_mask`"],
        ),
        (
            "untrained.jsonl",
            r#"{"input_ids": [1, 2], "trained": [false, false]}"#,
            &["no token of this example is trained"],
        ),
    ];
    for (name, bad, words) in cases {
        let path = file(
            &scratch,
            name,
            format!("{{\"text\": \"ok\"}}\n\n{bad}\n{{\"text\": \"ok\"}}\n").as_bytes(),
        );
        let mut needles = vec![*name];
        needles.extend_from_slice(words);
        if !words.iter().any(|w| w.starts_with("invalid JSON")) {
            needles.push("line 3:");
        }
        c.err(name, &needles, || Dataset::from_jsonl(&path, &tok));
    }

    // Lines that only a tokenizer without special tokens turns into nothing.
    let path = file(
        &scratch,
        "empty_text.jsonl",
        b"{\"text\": \"ab\"}\n{\"text\": \"\"}\n",
    );
    c.err(
        "empty text, bare tokenizer",
        &["empty_text.jsonl", "line 2:", "no tokens"],
        || Dataset::from_jsonl(&path, &bare),
    );
    let path = file(
        &scratch,
        "empty_completion.jsonl",
        b"{\"prompt\": \"a\", \"completion\": \"\"}\n",
    );
    c.err(
        "empty completion, no EOS",
        &["empty_completion.jsonl", "line 1:", "nothing to train"],
        || Dataset::from_jsonl(&path, &bare),
    );
    c.ok("empty completion with EOS is trained on EOS", || {
        Dataset::from_jsonl(&path, &tok)
    });

    let path = file(
        &scratch,
        "utf8.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"\xff\"}\n",
    );
    c.err("not UTF-8", &["utf8.jsonl", "line 2:", "not UTF-8"], || {
        Dataset::from_jsonl(&path, &tok)
    });
    let path = file(&scratch, "empty.jsonl", b"");
    c.err(
        "empty file",
        &["empty.jsonl", "no examples", "empty"],
        || Dataset::from_jsonl(&path, &tok),
    );
    let path = file(&scratch, "blank.jsonl", b"\n  \n\r\n");
    c.err("blank lines only", &["blank.jsonl", "no examples"], || {
        Dataset::from_jsonl(&path, &tok)
    });
    let missing = scratch.join("missing.jsonl");
    c.err("missing file", &["missing.jsonl"], || {
        Dataset::from_jsonl(&missing, &tok)
    });

    // An id the model does not have, named by example, token and the file's line.
    let path = file(
        &scratch,
        "vocab.jsonl",
        b"{\"input_ids\": [1, 2]}\n\n{\"input_ids\": [1, 63, 64, 2]}\n",
    );
    let data = c.ok("pre-tokenized data loads", || {
        Dataset::from_jsonl(&path, &tok)
    });
    if let Some(data) = data {
        c.err(
            "id out of vocab",
            &[
                "vocab.jsonl",
                "line 3",
                "line 3: token 2",
                "id 64",
                "64 tokens",
            ],
            || data.check_vocab(64),
        );
        c.ok("ids in vocab", || data.check_vocab(65));
    }
    c.finish();
}

#[test]
fn bad_arguments_are_refused() {
    let mut c = Checker::new();
    c.err(
        "length mismatch",
        &["2 token ids but 1 trained flags"],
        || Example::new(vec![1, 2], vec![true]),
    );
    c.err("no tokens", &["no tokens"], || Example::new(vec![], vec![]));
    let data = Dataset::from_examples(
        (0..4)
            .map(|i| Example::new(vec![i, i + 1], vec![true; 2]).unwrap())
            .collect(),
    );
    c.err(
        "subset out of range",
        &["subset index 4", "4 examples"],
        || data.subset(&[0, 4]),
    );
    c.err("eval takes all", &["eval_count", "none to train"], || {
        data.split_eval(4, 0)
    });
    c.err("check_vocab in code", &["example 0, token 1: id 1"], || {
        data.check_vocab(1)
    });
    let options = |batch_size, seq_len| BatchOptions {
        batch_size,
        seq_len,
        packing: Packing::Pack,
        pad_id: 0,
    };
    let cpu = Device::Cpu;
    for (what, o, words) in [
        ("batch_size 0", options(0, 8), &["batch_size"][..]),
        ("seq_len 0", options(2, 0), &["seq_len", "at least 2"]),
        ("seq_len 1", options(2, 1), &["seq_len", "at least 2"]),
    ] {
        for packing in [Packing::Pad, Packing::Pack] {
            let o = BatchOptions {
                packing,
                ..o.clone()
            };
            c.err(&format!("{what} {packing:?}"), words, || {
                data.batches(&o, 0, 0, &cpu)
            });
            c.err(&format!("{what} {packing:?} count"), words, || {
                data.batch_count(&o)
            });
        }
    }
    let empty = Dataset::default();
    c.err("empty dataset", &["no examples"], || {
        empty.batches(&options(1, 4), 0, 0, &cpu)
    });
    c.err("empty dataset count", &["no examples"], || {
        empty.batch_count(&options(1, 4))
    });
    c.finish();
}

// ---------------------------------------------------------------------------------------
// Subsets and splits.
// ---------------------------------------------------------------------------------------

/// `n` examples whose first id is `100 + i` (unique; other ids are below 100), of lengths
/// 1..=13 and varied trained flags.
fn numbered(n: usize) -> Dataset {
    Dataset::from_examples(
        (0..n)
            .map(|i| {
                let len = 1 + (i * 7) % 13;
                let ids = (0..len)
                    .map(|t| {
                        if t == 0 {
                            100 + i as u32
                        } else {
                            ((i + t) % 90) as u32
                        }
                    })
                    .collect();
                let trained = (0..len).map(|t| (i + t) % 3 != 0).collect();
                Example::new(ids, trained).unwrap()
            })
            .collect(),
    )
}

fn first_ids(data: &Dataset) -> Vec<u32> {
    data.examples().iter().map(|e| e.ids[0]).collect()
}

#[test]
fn subset_and_split_eval() {
    let data = numbered(20);
    assert_eq!(
        first_ids(&data.subset(&[3, 1, 3]).unwrap()),
        [103, 101, 103]
    );
    let (train, eval) = data.split_eval(5, 9).unwrap();
    assert_eq!((train.len(), eval.len()), (15, 5));
    let (t, e) = (first_ids(&train), first_ids(&eval));
    assert!(
        t.windows(2).all(|w| w[0] < w[1]),
        "train keeps the order: {t:?}"
    );
    assert!(
        e.windows(2).all(|w| w[0] < w[1]),
        "eval keeps the order: {e:?}"
    );
    let all: BTreeSet<u32> = t.iter().chain(&e).copied().collect();
    assert_eq!(all, first_ids(&data).into_iter().collect());
    // Deterministic per seed; another seed picks other examples.
    let (train2, eval2) = data.split_eval(5, 9).unwrap();
    assert_eq!((first_ids(&train2), first_ids(&eval2)), (t, e.clone()));
    let others: Vec<Vec<u32>> = (10..14)
        .map(|seed| first_ids(&data.split_eval(5, seed).unwrap().1))
        .collect();
    assert!(others.iter().any(|o| *o != e), "{others:?}");
    let (_, none) = data.split_eval(0, 1).unwrap();
    assert!(none.is_empty());
}

// ---------------------------------------------------------------------------------------
// Batches.
// ---------------------------------------------------------------------------------------

struct Plain {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<f32>>,
}

fn plain(batch: &Batch) -> Plain {
    Plain {
        ids: batch.input_ids.to_vec2::<u32>().unwrap(),
        mask: batch.loss_mask.to_vec2::<f32>().unwrap(),
    }
}

/// The mask's ones at t >= 1, after checking every entry is 0 or 1 and t = 0 is 0.
fn mask_targets(p: &Plain) -> usize {
    let mut n = 0;
    for row in &p.mask {
        assert_eq!(row[0], 0.0, "position 0 is never a target");
        for &m in row {
            assert!(m == 0.0 || m == 1.0, "{m}");
        }
        n += row.iter().skip(1).filter(|&&m| m == 1.0).count();
    }
    n
}

fn by_first_id(data: &Dataset, id: u32) -> &Example {
    &data.examples()[(id - 100) as usize]
}

/// The order of the epoch's examples, from Pad batches (every example is a row).
fn pad_order(data: &Dataset, batches: &[Batch]) -> Vec<u32> {
    let order: Vec<u32> = batches
        .iter()
        .flat_map(|b| plain(b).ids)
        .map(|r| r[0])
        .collect();
    let distinct: BTreeSet<u32> = order.iter().copied().collect();
    assert_eq!((order.len(), distinct.len()), (data.len(), data.len()));
    order
}

#[test]
fn pad_batches_truncate_pad_and_mask() {
    let data = numbered(11);
    let options = BatchOptions {
        batch_size: 3,
        seq_len: 8,
        packing: Packing::Pad,
        pad_id: 99,
    };
    let batches = data.batches(&options, 2, 5, &Device::Cpu).unwrap();
    assert_eq!(batches.len(), 4);
    assert_eq!(data.batch_count(&options).unwrap(), 4);
    pad_order(&data, &batches);
    for (k, batch) in batches.iter().enumerate() {
        let p = plain(batch);
        assert_eq!(p.ids.len(), if k == 3 { 2 } else { 3 }, "batch {k} rows");
        let rows: Vec<&Example> = p.ids.iter().map(|r| by_first_id(&data, r[0])).collect();
        let width = rows.iter().map(|e| e.len().min(8)).max().unwrap();
        assert_eq!(
            batch.input_ids.dims(),
            [rows.len(), width],
            "padded to the longest row"
        );
        let mut targets = 0;
        for ((ids, mask), ex) in p.ids.iter().zip(&p.mask).zip(&rows) {
            let kept = ex.len().min(8);
            assert_eq!(&ids[..kept], &ex.ids[..kept]);
            assert!(
                ids[kept..].iter().all(|&id| id == 99),
                "right padding with pad_id"
            );
            assert_eq!(mask.len(), width);
            for (t, &m) in mask.iter().enumerate() {
                let want = t > 0 && t < kept && ex.trained[t];
                assert_eq!(m, if want { 1.0 } else { 0.0 }, "t {t}");
            }
            targets += ex.trained[..kept].iter().skip(1).filter(|&&t| t).count();
        }
        assert_eq!(batch.target_tokens, targets);
        assert_eq!(mask_targets(&p), targets);
    }
}

#[test]
fn pack_rows_are_the_shuffled_examples_concatenated() {
    let data = numbered(17);
    let pad = BatchOptions {
        batch_size: 1,
        seq_len: 64,
        packing: Packing::Pad,
        pad_id: 0,
    };
    let pack = BatchOptions {
        batch_size: 4,
        seq_len: 6,
        packing: Packing::Pack,
        ..pad.clone()
    };
    let batches = data.batches(&pack, 3, 11, &Device::Cpu).unwrap();
    let total = data.total_tokens();
    let rows = total / 6;
    assert_eq!(batches.len(), rows.div_ceil(4));
    assert_eq!(data.batch_count(&pack).unwrap(), batches.len());
    let mut stream_ids = Vec::new();
    let mut stream_mask = Vec::new();
    for (k, batch) in batches.iter().enumerate() {
        let p = plain(batch);
        let n = if k + 1 == batches.len() {
            rows - 4 * k
        } else {
            4
        };
        assert_eq!(batch.input_ids.dims(), [n, 6], "batch {k}");
        assert_eq!(batch.target_tokens, mask_targets(&p));
        stream_ids.extend(p.ids.into_iter().flatten());
        stream_mask.extend(p.mask.into_iter().flatten());
    }
    assert_eq!(
        stream_ids.len(),
        rows * 6,
        "the incomplete tail row is dropped"
    );

    // The examples in the epoch's order (the same order Pad batches show), concatenated.
    let order = pad_order(&data, &data.batches(&pad, 3, 11, &Device::Cpu).unwrap());
    let (ids, trained): (Vec<u32>, Vec<bool>) = order
        .iter()
        .flat_map(|&id| {
            let e = by_first_id(&data, id);
            e.ids.iter().copied().zip(e.trained.iter().copied())
        })
        .unzip();
    assert_eq!(stream_ids, ids[..stream_ids.len()]);
    for (i, &m) in stream_mask.iter().enumerate() {
        let want = i % 6 != 0 && trained[i];
        assert_eq!(m, if want { 1.0 } else { 0.0 }, "stream position {i}");
    }
}

#[test]
fn pack_pads_a_lone_short_row() {
    let data = Dataset::from_examples(vec![
        Example::new(vec![1, 5, 2], vec![false, true, true]).unwrap(),
        Example::new(vec![1, 6], vec![true, true]).unwrap(),
    ]);
    let options = BatchOptions {
        batch_size: 4,
        seq_len: 8,
        packing: Packing::Pack,
        pad_id: 7,
    };
    let batches = data.batches(&options, 0, 0, &Device::Cpu).unwrap();
    assert_eq!((batches.len(), data.batch_count(&options).unwrap()), (1, 1));
    let p = plain(&batches[0]);
    assert_eq!(p.ids.len(), 1);
    assert_eq!(p.ids[0].len(), 8);
    assert_eq!(&p.ids[0][5..], [7, 7, 7]);
    assert!(p.mask[0][5..].iter().all(|&m| m == 0.0));
    assert_eq!(batches[0].target_tokens, 3);
    assert_eq!(mask_targets(&p), 3);
}

fn epoch_ids(
    data: &Dataset,
    options: &BatchOptions,
    epoch: usize,
    seed: u64,
) -> Vec<Vec<Vec<u32>>> {
    let batches = data.batches(options, epoch, seed, &Device::Cpu).unwrap();
    batches.iter().map(|b| plain(b).ids).collect()
}

#[test]
fn batches_are_deterministic_per_seed_and_epoch() {
    let data = numbered(12);
    for packing in [Packing::Pad, Packing::Pack] {
        let o = BatchOptions {
            batch_size: 4,
            seq_len: 5,
            packing,
            pad_id: 0,
        };
        let a = epoch_ids(&data, &o, 1, 3);
        assert_eq!(a, epoch_ids(&data, &o, 1, 3), "{packing:?}: same inputs");
        assert_ne!(a, epoch_ids(&data, &o, 2, 3), "{packing:?}: another epoch");
        assert_ne!(a, epoch_ids(&data, &o, 1, 4), "{packing:?}: another seed");
        let masks = |e| {
            let batches = data.batches(&o, e, 3, &Device::Cpu).unwrap();
            batches.iter().map(|b| plain(b).mask).collect::<Vec<_>>()
        };
        assert_eq!(masks(1), masks(1));
    }
}

#[test]
fn batch_count_equals_the_number_of_batches() {
    let data = numbered(9);
    for packing in [Packing::Pad, Packing::Pack] {
        for batch_size in [1, 2, 4, 9, 20] {
            for seq_len in [2, 3, 7, 40, 500] {
                let o = BatchOptions {
                    batch_size,
                    seq_len,
                    packing,
                    pad_id: 0,
                };
                let n = data.batches(&o, 0, 1, &Device::Cpu).unwrap().len();
                assert_eq!(data.batch_count(&o).unwrap(), n, "{o:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The bundled tokenizer trainer.
// ---------------------------------------------------------------------------------------

/// The corpus scripts/make_tokenizer_fixture.py trains tests/fixtures/tokenizer on.
const FIXTURE_CORPUS: [&str; 6] = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "sort the numbers: 3 1 2 becomes 1 2 3",
    "question: what is two plus two? answer: four",
    "hello world, hello rust, hello candle",
    "low rank adapters train only a few parameters",
];

#[test]
fn tiny_tokenizer_reproduces_the_python_trained_fixture() {
    let tok = tiny_tokenizer(&FIXTURE_CORPUS, 64).unwrap();
    let fixture = tokenizer();
    assert_eq!(tok.inner().get_vocab(true), fixture.inner().get_vocab(true));
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    let cases = read_json(Path::new(TOKENIZER).join("expected.json"));
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            u32s(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(
            tok.encode(text, false).unwrap(),
            u32s(&case["ids_no_special"]),
            "{text:?}"
        );
        let decoded = tok.decode(&u32s(&case["ids"]), true).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap());
    }
}

#[test]
fn tiny_tokenizer_refuses_what_it_cannot_build() {
    let mut c = Checker::new();
    c.err("empty corpus", &["corpus", "no text"], || {
        tiny_tokenizer(&[" ", ""], 64)
    });
    c.err(
        "vocab below the alphabet",
        &["vocab_size", "10 is too small"],
        || tiny_tokenizer(&FIXTURE_CORPUS, 10),
    );
    c.finish();
}

// ---------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------

fn datasets() -> impl Strategy<Value = Vec<Example>> {
    let example = prop::collection::vec((0u32..50, any::<bool>()), 1..=12).prop_map(|tokens| {
        let (ids, trained) = tokens.into_iter().unzip();
        Example::new(ids, trained).unwrap()
    });
    prop::collection::vec(example, 1..=10)
}

fn options() -> impl Strategy<Value = BatchOptions> {
    (1usize..=5, 2usize..=16, any::<bool>()).prop_map(|(batch_size, seq_len, pack)| BatchOptions {
        batch_size,
        seq_len,
        packing: if pack { Packing::Pack } else { Packing::Pad },
        pad_id: 50,
    })
}

proptest! {
    #![proptest_config(crate::props_support::config(64))]

    #[test]
    fn batches_keep_every_token_and_target(
        examples in datasets(), o in options(), epoch in 0usize..4, seed in any::<u64>(),
    ) {
        let data = Dataset::from_examples(examples);
        let batches = data.batches(&o, epoch, seed, &Device::Cpu).unwrap();
        prop_assert_eq!(batches.len(), data.batch_count(&o).unwrap());
        let mut tokens = 0;
        for (k, batch) in batches.iter().enumerate() {
            let p = plain(batch);
            prop_assert!(p.ids.len() <= o.batch_size);
            prop_assert!(k + 1 == batches.len() || p.ids.len() == o.batch_size);
            prop_assert_eq!(batch.target_tokens, mask_targets(&p));
            for row in &p.ids {
                prop_assert!(row.len() <= o.seq_len);
                if o.packing == Packing::Pack {
                    prop_assert_eq!(row.len(), o.seq_len);
                }
                tokens += row.iter().filter(|&&id| id != 50).count();
            }
        }
        let total = data.total_tokens();
        let kept = match o.packing {
            Packing::Pad => data.examples().iter().map(|e| e.len().min(o.seq_len)).sum(),
            Packing::Pack if total < o.seq_len => total,
            Packing::Pack => total - total % o.seq_len,
        };
        prop_assert_eq!(tokens, kept);
    }
}
