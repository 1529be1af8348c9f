"""Writes tests/fixtures/finetune_data/: a JSONL file with every form lorakit's
`Dataset::from_jsonl` reads, and transformers' token ids and trained flags for each of its
examples (expected.json), through the tiny tokenizer of tests/fixtures/tokenizer/.

    python3 scripts/make_finetune_data_fixture.py

Needs `pip install transformers tokenizers`. The reference follows the rule lorakit
documents, with transformers doing the tokenizing:

* `{"text": t}`: `tok(t)["input_ids"] + [eos]`, every token trained;
* `{"prompt": p, "completion": c}`: `tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"] + [eos]`,
  the prompt's tokens not trained;
* `{"input_ids": ids, "trained" | "labels_mask": flags}`: as given (all trained without flags).

Also writes bad_json.jsonl (line 2 is not JSON), used by a doc example.
"""
import json
from pathlib import Path

from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
OUT = ROOT / "tests" / "fixtures" / "finetune_data"

# (raw line, or None for a blank line). One line ends in CRLF, one has a key lorakit ignores.
ROWS = [
    {"text": "hello world"},
    {"prompt": "question: what is two plus two? ", "completion": "answer: four"},
    None,
    {"text": "The lazy fox!", "source": "extra keys are ignored"},
    {"prompt": "sort: 3 1 2", "completion": " 1 2 3", "id": 7},
    {"input_ids": [1, 49, 35, 2], "trained": [False, True, True, True]},
    {"input_ids": [1, 51, 2]},
    {"text": "Zebra 42 café"},
    {"prompt": "", "completion": "hello"},
    {"input_ids": [1, 36, 37, 2], "labels_mask": [False, False, True, True]},
    {"text": ""},
]
CRLF_ROW = 7  # index in ROWS of the line written with "\r\n"


def reference(tok, row):
    eos = [tok.eos_token_id]
    if "text" in row:
        ids = tok(row["text"])["input_ids"] + eos
        return ids, [True] * len(ids)
    if "prompt" in row:
        prompt = tok(row["prompt"])["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + eos
        return prompt + completion, [False] * len(prompt) + [True] * len(completion)
    ids = row["input_ids"]
    flags = row.get("trained", row.get("labels_mask", [True] * len(ids)))
    return ids, flags


def main():
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1
    OUT.mkdir(parents=True, exist_ok=True)
    lines, expected = [], []
    for i, row in enumerate(ROWS):
        if row is None:
            lines.append("\n")
            continue
        end = "\r\n" if i == CRLF_ROW else "\n"
        lines.append(json.dumps(row, ensure_ascii=False) + end)
        ids, trained = reference(tok, row)
        expected.append({"line": i + 1, "ids": ids, "trained": trained})
    (OUT / "mixed.jsonl").write_bytes("".join(lines).encode("utf-8"))
    (OUT / "expected.json").write_text(
        "[\n" + ",\n".join(json.dumps(e) for e in expected) + "\n]\n"
    )
    (OUT / "bad_json.jsonl").write_text('{"text": "fine"}\n{"text": "oops"\n')
    print(f"wrote {OUT} ({len(expected)} examples)")


if __name__ == "__main__":
    main()
