#!/usr/bin/env python3
"""Fixtures for sequence-classification fine-tuning (`lorakit::finetune::classification`,
tests/suite/finetune_classify.rs), written by tokenizers, transformers 5.24, PEFT 0.21.2
and PyTorch on the CPU.

    python3 scripts/make_classify_fixtures.py            # writes tests/fixtures/finetune/classify/
    python3 scripts/make_classify_fixtures.py --check-trained DIR
        loads the PEFT adapter folder DIR (one lorakit's Trainer saved: `cargo run --release
        --example classify`) onto encoder/ with 2 labels through PEFT and writes
        DIR/peft_logits.safetensors (the inputs of reference_texts() and PEFT's logits).

Writes, under tests/fixtures/finetune/classify/:
  tokenizer/      a BERT-style WordPiece tokenizer (vocab 61: [PAD]=0, [UNK]=1, [CLS]=2,
                  [SEP]=3, [MASK]=4, CORPUS's words, its characters and their ## forms, all
                  of them; lowercasing; `[CLS] a [SEP] b [SEP]` with b's token types 1),
                  and expected.json: transformers'
                  BertTokenizerFast encodings (input_ids, token_type_ids) of TEXTS with
                  truncation=True, max_length=8.
  encoder/        a tiny pretrained-encoder checkpoint as the Hub has them (BertForPreTraining:
                  `bert.*` and `cls.predictions.*`, no classifier; hidden 16, 2 layers, the
                  tokenizer's vocabulary, 32 positions, dropout 0.1).
  train.jsonl     24 labeled sentences (1 positive, 0 negative), three with a `text_pair`.
  step/           one training step of PEFT's LoRA on BertForSequenceClassification (encoder
                  with 2 labels, dropout set to 0), target query/value, r=4, alpha=8,
                  init_lora_weights=False (B random, so A gets gradients), task_type SEQ_CLS
                  (classifier in modules_to_save):
                    adapter/            the adapter before the step (save_pretrained)
                    batch.safetensors   input_ids, token_type_ids, attention_mask (3, t) i64
                                        and labels (3,) i64: train.jsonl's lines 1, 2 and its first
                                        pair tokenized as transformers does
                    expected.safetensors loss (the batch mean), grad_norm (before clipping)
                                        and every trainable tensor after one
                                        torch.optim.AdamW step (lr 1e-2, no weight decay)
                                        with clip_grad_norm_(1.0), named as lorakit names
                                        them (`<path>.lora_A`, `classifier.weight`)
  trained_dora/   an adapter lorakit's Trainer wrote (the classify example on the files above:
                  DoRA r=4 on query/value, a new head, 100 steps at lr 0.1):
                    cargo run --release --example classify -- --method dora --rank 4 \
                        --lr 0.1 --steps 100 --out /tmp/cls-dora
                  then its adapter_config.json and adapter_model.safetensors copied here and
                  peft_logits.safetensors written by --check-trained (PEFT's logits on it).
"""
import argparse
import json
from pathlib import Path

from fixture_env import rerun_pinned

rerun_pinned()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "finetune" / "classify"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = [
    "a good film", "great fun", "a great cast and a good story", "good acting",
    "fun and good", "the story was great", "a fun ride", "good music and great fun",
    "great", "the cast was good", "a good time", "it was fun",
]
NEGATIVE = [
    "a bad film", "dull and slow", "a bad cast and a dull story", "bad acting",
    "slow and bad", "the story was dull", "a slow ride", "bad music and dull scenes",
    "dull", "the cast was bad", "a bad time", "it was slow",
]
CORPUS = POSITIVE + NEGATIVE
PAIRS = {3: "the music", 15: "the music", 21: "the film"}
TEXTS = [("a good film", None), ("the story was great", "the cast was bad"),
         ("a great cast and a good story", None), ("good music", "x y z unknown")]


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # The vocabulary is listed rather than trained: the WordPiece trainer's order changes
    # from run to run. Whole words first, then single characters and their `##` forms.
    words = sorted({w for text in CORPUS for w in text.split()} - {"a"})
    chars = sorted({c for text in CORPUS for c in text if c != " "})
    pieces = SPECIALS + words + chars + ["##" + c for c in chars]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    out = OUT / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizerFast", "do_lower_case": True,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]",
    }, indent=2) + "\n")
    hf = hf_tokenizer()
    cases = []
    for text, pair in TEXTS:
        enc = hf(text, pair, truncation=True, max_length=8)
        cases.append({"text": text, "text_pair": pair, "input_ids": enc["input_ids"],
                      "token_type_ids": enc["token_type_ids"]})
    (out / "expected.json").write_text(json.dumps({"max_length": 8, "cases": cases}, indent=1) + "\n")
    return tok.get_vocab_size()


def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(OUT / "tokenizer"))


def encoder(vocab):
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    model = BertForPreTraining(config).eval()
    model.save_pretrained(str(OUT / "encoder"))
    for extra in ["generation_config.json"]:
        (OUT / "encoder" / extra).unlink(missing_ok=True)


def train_jsonl():
    lines = []
    for i, (text, label) in enumerate(zip(CORPUS, [1] * len(POSITIVE) + [0] * len(NEGATIVE))):
        row = {"text": text, "label": label}
        if i in PAIRS:
            row["text_pair"] = PAIRS[i]
        lines.append(json.dumps(row))
    # Interleave, so the first lines hold both classes.
    order = [j for pair in zip(range(12), range(12, 24)) for j in pair]
    (OUT / "train.jsonl").write_text("\n".join(lines[j] for j in order) + "\n")


def classifier(dropout):
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    kwargs = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if not dropout else {}
    return BertForSequenceClassification.from_pretrained(str(OUT / "encoder"), num_labels=2, **kwargs)


def lorakit_name(name):
    name = name.removeprefix("base_model.model.").replace(".default", "")
    if ".modules_to_save." in name:
        return name.replace(".modules_to_save", "")
    return name.removesuffix(".weight")


def step():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(classifier(dropout=False), LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
        init_lora_weights=False))
    out = OUT / "step"
    model.save_pretrained(str(out / "adapter"))
    config_file = out / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "tests/fixtures/finetune/classify/encoder"  # not this machine's path
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "adapter" / "README.md").unlink()  # PEFT's model card names this machine's paths
    model.train()
    lines = [json.loads(line) for line in (OUT / "train.jsonl").read_text().splitlines()]
    rows = [lines[0], lines[1], next(r for r in lines if "text_pair" in r)]
    hf = hf_tokenizer()
    encs = [hf(r["text"], r.get("text_pair"), truncation=True, max_length=16) for r in rows]
    width = max(len(e["input_ids"]) for e in encs)
    pad = lambda xs: xs + [0] * (width - len(xs))  # noqa: E731
    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"]) for e in encs]),
        "token_type_ids": torch.tensor([pad(e["token_type_ids"]) for e in encs]),
        "attention_mask": torch.tensor([pad(e["attention_mask"]) for e in encs]),
        "labels": torch.tensor([r["label"] for r in rows]),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss = model(**batch).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    expected = {"loss": torch.tensor(float(loss), dtype=torch.float64),
                "grad_norm": torch.tensor(float(norm), dtype=torch.float64)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected[lorakit_name(name)] = p.detach().clone().contiguous()
    save_file(batch, str(out / "batch.safetensors"))
    save_file(expected, str(out / "expected.safetensors"))


def reference_texts():
    lines = [json.loads(line) for line in (OUT / "train.jsonl").read_text().splitlines()]
    return [(r["text"], r.get("text_pair")) for r in lines[:6]]


def check_trained(directory):
    from peft import PeftModel

    model = PeftModel.from_pretrained(classifier(dropout=True), directory).eval()
    hf = hf_tokenizer()
    encs = [hf(t, p, truncation=True, max_length=16) for t, p in reference_texts()]
    width = max(len(e["input_ids"]) for e in encs)
    pad = lambda xs: xs + [0] * (width - len(xs))  # noqa: E731
    inputs = {k: torch.tensor([pad(e[k]) for e in encs]) for k in ["input_ids", "token_type_ids", "attention_mask"]}
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({**inputs, "logits": logits.contiguous()}, str(Path(directory) / "peft_logits.safetensors"))
    print(f"wrote {directory}/peft_logits.safetensors: {logits.tolist()}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--check-trained", metavar="DIR")
    args = parser.parse_args()
    if args.check_trained:
        check_trained(args.check_trained)
        return
    vocab = tokenizer()
    encoder(vocab)
    train_jsonl()
    step()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
