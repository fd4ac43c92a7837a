#!/usr/bin/env python3
"""Loads the folders `cargo run --release --example export_check -- DIR` wrote with Hugging Face
`transformers` (the `AutoModelFor...` class each `config.json` names, and `AutoTokenizer`) and
compares token ids and F32 logits with this crate's (`reference.json` in each folder).

    pip install --user transformers   # with torch (CPU is enough)
    python3 scripts/check_hf_export.py DIR

Exits non-zero when the tokenization differs or a logit differs by more than 1e-4 relative
(to the largest logit magnitude). Not run in CI (it needs torch and transformers).
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

TOLERANCE = 1e-4


def compare(name, ours, theirs):
    ours = torch.tensor(ours, dtype=torch.float32)
    theirs = theirs.detach().to(torch.float32)
    scale = ours.abs().max().clamp(min=1e-12)
    error = ((ours - theirs).abs().max() / scale).item()
    status = "ok" if error <= TOLERANCE else "FAIL"
    print(f"{name}: max relative logit difference {error:.2e} ({status})")
    return error <= TOLERANCE


def main(root):
    ok = True

    folder = f"{root}/llama"
    ref = json.load(open(f"{folder}/reference.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(ref["text"], add_special_tokens=True)["input_ids"]
    same = ids == ref["input_ids"]
    print(f"llama: tokenization {'identical' if same else 'DIFFERS'} ({len(ids)} tokens); "
          f"eos={tokenizer.eos_token!r} bos={tokenizer.bos_token!r} pad={tokenizer.pad_token!r} "
          f"chat_template={'present' if tokenizer.chat_template else 'MISSING'}")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    print(f"llama: chat template renders {rendered!r}")
    ok &= same
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    print(f"llama: loaded {type(model).__name__}")
    with torch.no_grad():
        logits = model(torch.tensor([ref["input_ids"]])).logits[0]
    ok &= compare("llama", ref["logits"], logits)

    folder = f"{root}/bert"
    ref = json.load(open(f"{folder}/reference.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(ref["texts"], padding=True, return_tensors="pt")
    same = encoded["input_ids"].tolist() == ref["input_ids"]
    print(f"bert: tokenization {'identical' if same else 'DIFFERS'}")
    ok &= same
    model = AutoModelForSequenceClassification.from_pretrained(folder, torch_dtype=torch.float32)
    model.eval()
    print(f"bert: loaded {type(model).__name__}, num_labels={model.config.num_labels}, "
          f"id2label={model.config.id2label}")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ref["input_ids"]),
                       attention_mask=torch.tensor(ref["attention_mask"])).logits
    ok &= compare("bert", ref["logits"], logits)
    ours = torch.tensor(ref["logits"]).argmax(-1).tolist()
    print(f"bert: labels ours {ours}, transformers {logits.argmax(-1).tolist()}")
    ok &= ours == logits.argmax(-1).tolist()

    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
