"""Loads an adapter written by candle-fit into Hugging Face PEFT and compares logits.

The files come from tests/lora.rs `our_adapter_files_for_peft` (a seeded tiny LLaMA as a
Hugging Face folder, LoRA r = 4 on q/v/down with random B as PEFT's adapter_config.json +
adapter_model.safetensors, and `ids` + our `logits` in ours.safetensors). Run by hand from the
repository root (not in CI: it needs torch, transformers and peft):

    CANDLE_FIT_PEFT_OURS=/tmp/peft-ours cargo test --test lora our_adapter_files_for_peft
    python3 scripts/reference/peft_load_ours.py /tmp/peft-ours

Prints the largest difference relative to the largest logit and exits non-zero above 1e-5.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


def main() -> int:
    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/peft-ours"
    base = LlamaForCausalLM.from_pretrained(f"{root}/base", torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, f"{root}/adapter").eval()
    ours = load_file(f"{root}/ours.safetensors")
    with torch.no_grad():
        theirs = model(input_ids=ours["ids"]).logits
    # The adapters must matter: PEFT's logits without them differ.
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ours["ids"]).logits
    scale = theirs.abs().max().item()
    rel = (theirs - ours["logits"]).abs().max().item() / scale
    moved = (theirs - plain).abs().max().item() / scale
    print(f"PEFT loaded {len(model.peft_config['default'].target_modules)} target module names; "
          f"logits vs ours: max relative difference {rel:.3e}; the adapters move the logits by {moved:.3e}")
    return 0 if rel <= 1e-5 and moved > 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
