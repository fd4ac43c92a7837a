"""Reference values for candle-train's LoRA from Hugging Face transformers + PEFT.

Builds a seeded tiny LLaMA (the shape of `LlamaConfig::tiny()`), wraps it with PEFT's LoRA
(r = 4, alpha = 8, rsLoRA off, q/v/down projections, B drawn at random instead of zero so the
adapters change the output), and writes to tests/data/peft_lora/:

- base/: the base model (`save_pretrained`: config.json + model.safetensors, F32);
- adapter/: the adapter as PEFT saves it (adapter_config.json + adapter_model.safetensors);
- golden.safetensors: `ids` and `targets` ([2, 6], I64), the adapted model's `logits`, and
  `grad.<name>` for every adapter tensor under its file name: the gradient of the mean
  cross-entropy of the logits against `targets` (no shift: targets are the next tokens already).

tests/lora.rs loads the base and the adapter and compares logits and gradients. Run from the
repository root:

    python3 scripts/reference/peft_lora.py

Needs torch, transformers and peft (the committed files came from torch 2.15.0,
transformers 5.25.0, peft 0.21.2).
"""
import os

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

OUT = "tests/data/peft_lora"


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=23,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    base = LlamaForCausalLM(config).to(torch.float32).eval()
    base.save_pretrained(os.path.join(OUT, "base"), safe_serialization=True)

    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # B random too, so the adapters change the logits
    )
    model = get_peft_model(base, lora)
    model.save_pretrained(os.path.join(OUT, "adapter"))
    os.remove(os.path.join(OUT, "adapter", "README.md"))  # PEFT's model card template

    ids = torch.tensor([[(i * 7 + 3) % 23 for i in range(r * 6, r * 6 + 6)] for r in range(2)])
    targets = (ids * 5 + 1) % 23
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), targets.reshape(-1))
    loss.backward()
    golden = {"ids": ids, "targets": targets, "logits": logits.detach().contiguous()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            golden["grad." + name.replace(".default", "")] = p.grad.detach().contiguous()
    save_file(golden, os.path.join(OUT, "golden.safetensors"))
    print(f"wrote {OUT}: loss {loss.item():.6f}, {len(golden) - 3} adapter gradients")


if __name__ == "__main__":
    main()
