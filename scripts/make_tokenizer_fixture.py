"""Writes tests/fixtures/tokenizer/: a tiny Llama-style tokenizer (vocab 64, so its ids fit
the fixture models of tests/fixtures/models/) trained by the `tokenizers` Python package,
with transformers' own encodings of a few strings as the reference (expected.json).

    python3 scripts/make_tokenizer_fixture.py

Needs `pip install tokenizers transformers`. Deterministic: the BPE trainer is run on a
fixed corpus with one thread.
"""
import json
import os
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizer"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "sort the numbers: 3 1 2 becomes 1 2 3",
    "question: what is two plus two? answer: four",
    "hello world, hello rust, hello candle",
    "low rank adapters train only a few parameters",
]
STRINGS = ["hello world", "the lazy fox", "answer: four!", "Zebra 42", ""]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=64, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "unk_token": "<unk>",
    }, indent=2) + "\n")

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(OUT))
    expected = []
    for s in STRINGS:
        with_special = hf(s)["input_ids"]
        plain = hf(s, add_special_tokens=False)["input_ids"]
        expected.append({
            "text": s,
            "ids": with_special,
            "ids_no_special": plain,
            "decoded": hf.decode(with_special, skip_special_tokens=True),
        })
    (OUT / "expected.json").write_text(json.dumps({
        "vocab_size": len(hf), "bos_id": hf.bos_token_id, "eos_id": hf.eos_token_id,
        "cases": expected,
    }, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} (vocab {len(hf)})")


if __name__ == "__main__":
    main()
