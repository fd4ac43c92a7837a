#!/usr/bin/env python3
"""PyTorch reference for `candle-fit bench`: the same GPT, data, optimizer and schedule, the same
configuration names, and the same JSON row schema (src/bench.rs `BenchRow`), so the two outputs
can be put side by side.

Model: GPT-2 (byte vocabulary 256, learned positions, pre-norm blocks, tanh GELU, tied head),
heads of 32 dimensions, initialised N(0, 0.02) with residual projections scaled by
1/sqrt(2 n_layer). AdamW (lr 3e-3, weight decay 0.1 on matrices), linear warm-up over a quarter of
the steps then cosine to lr/10, gradient clipping at 1.0, batches of random windows of the
bundled Pride and Prejudice, validation loss on evenly spaced windows of its last 10%.

Configurations (candle-fit's names; `fp32-tf32` has no candle-fit twin):
  fp32             FP32, TF32 off (torch.backends.cuda.matmul.allow_tf32 = False, cudnn too)
  fp32-tf32        FP32 with TF32 matmuls
  recompute-all    FP32, torch.utils.checkpoint around every block
  recompute-sqrt   FP32, about sqrt(n) evenly spaced blocks kept, the rest checkpointed
  recompute-every2 FP32, every 2nd block checkpointed
  accum4           FP32, the batch as 4 accumulated micro-batches
  bf16             torch.autocast(bfloat16), FP32 weights (no scaler)
  f16              torch.autocast(float16) + torch.amp.GradScaler
  bf16+recompute-all+accum4

Attention: `--attention sdpa` (default) uses F.scaled_dot_product_attention, fused kernels that
never hold the score matrix; `--attention naive` materialises it as candle-fit does.

Memory: on CUDA, `peak_bytes` is torch.cuda.max_memory_allocated over a step (reset before
it), the counterpart of candle-fit's memory-pool high-water mark; on CPU nothing is measured
(peak_bytes 0, memory_source "none"). Time: the device is synchronized before the clock is read;
warm-up steps are not timed; medians are reported.

usage (from the repository root, or pass --corpus):
  python3 benches/pytorch_reference.py --device cuda --layers 4,8 --width 128,256 \\
      --batch 16 --seq-len 128 --steps 20 --warmup 5 --json out.json --markdown out.md
  python3 benches/pytorch_reference.py --device cpu --layers 1 --width 32 --batch 2 \\
      --seq-len 16 --steps 1 --warmup 0 --configs fp32      # a CPU smoke run
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CONFIGS = {
    # name: (precision, tf32, recompute, accumulation steps)
    "fp32": ("f32", False, "never", 1),
    "fp32-tf32": ("f32", True, "never", 1),
    "recompute-all": ("f32", False, "all", 1),
    "recompute-sqrt": ("f32", False, "sqrt", 1),
    "recompute-every2": ("f32", False, "every2", 1),
    "accum4": ("f32", False, "never", 4),
    "bf16": ("bf16", False, "never", 1),
    "f16": ("f16", False, "never", 1),
    "bf16+recompute-all+accum4": ("bf16", False, "all", 4),
}
BASELINE = "fp32"


class Block(nn.Module):
    naive_attention = False  # set by --attention naive

    def __init__(self, width, heads, eps):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.naive_attention:  # as candle-fit computes it: the whole score matrix, softmax in FP32
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            probs = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
            y = probs @ v
        else:  # fused (flash / memory-efficient) attention, as one would write it in PyTorch
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, layers, width, context, vocab=256, eps=1e-5):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.h = nn.ModuleList(Block(width, max(width // 32, 1), eps) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width, eps=eps)
        self.keep = [True] * layers
        proj_std = 0.02 / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" in name:
                nn.init.ones_(p)
            elif name == "wpe.weight":
                nn.init.normal_(p, std=0.01)
            elif name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                nn.init.normal_(p, std=proj_std)
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for keep, block in zip(self.keep, self.h):
            x = block(x) if keep or not self.training else checkpoint(block, x, use_reentrant=False)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def keep_mask(policy, layers):
    if policy == "never":
        return [True] * layers
    if policy == "all":
        return [False] * layers
    if policy == "every2":  # every 2nd block recomputed: blocks 1, 3, 5, ...
        return [i % 2 == 0 for i in range(layers)]
    # sqrt, as candle-ckpt's Recompute::Sqrt: ceil(sqrt(n)) blocks kept, at j * n / kept.
    kept = math.ceil(math.sqrt(layers))
    chosen = {j * layers // kept for j in range(kept)}
    return [i in chosen for i in range(layers)]


def lr_at(step, total, peak):
    warmup = total // 4
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak / 10 + 0.5 * (peak - peak / 10) * (1 + math.cos(math.pi * min(progress, 1.0)))


def run_one(args, layers, width, name, data, device):
    precision, tf32, policy, accum = CONFIGS[name]
    if args.batch % accum:
        sys.exit(f"configuration `{name}` cuts the batch into {accum} micro-batches, which does not divide {args.batch}")
    cuda = device.type == "cuda"
    if cuda:
        # "highest" keeps FP32 matmuls in FP32; "high" lets them use TF32.
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = Gpt(layers, width, args.seq_len).to(device)
    model.keep = keep_mask(policy, layers)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, foreach=True)
    dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "f16")
    train, val = data
    micro = args.batch // accum
    total = args.warmup + args.steps

    def batch(n):
        starts = [rng.randrange(len(train) - args.seq_len - 1) for _ in range(n)]
        rows = torch.stack([train[s:s + args.seq_len + 1] for s in starts]).to(device)
        return rows[:, :-1], rows[:, 1:]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times, peaks, start_bytes = [], [], 0
    model.train()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr)
        sync()
        if cuda:
            start_bytes = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(accum):
            x, y = batch(micro)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(x, y) / accum
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated, as candle-fit's accumulators
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            peaks.append((torch.cuda.max_memory_allocated() if cuda else 0, start_bytes))

    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        n = max(1, min(args.eval_windows, (len(val) - 1) // args.seq_len))
        max_start = len(val) - 1 - args.seq_len
        starts = [0] if n == 1 else [i * max_start // (n - 1) for i in range(n)]
        losses = []
        for chunk in range(0, len(starts), micro):
            rows = torch.stack([val[s:s + args.seq_len + 1] for s in starts[chunk:chunk + micro]]).to(device)
            losses.append(model(rows[:, :-1], rows[:, 1:]).item() * len(rows))
        final_loss = sum(losses) / len(starts)

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(model.parameters())
    grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    optim = nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    peak, start = max(peaks) if peaks else (0, 0)
    median = statistics.median(times) if times else float("nan")
    return {
        "config": name,
        "model": f"L{layers}-W{width}",
        # sdpa: fused attention; naive: the score matrix materialised, as candle-fit does.
        "framework": f"pytorch-{args.attention}",
        "device": f"cuda:{device.index or 0}" if cuda else "cpu",
        "precision": precision,
        "micro_batch": micro,
        "accum_steps": accum,
        "world_size": 1,
        "peak_bytes": peak,
        "memory_source": "torch.cuda.max_memory_allocated" if cuda else "none",
        "bytes_by_category": {
            "parameters": params,
            "gradients": grads,
            "master_weights": 0,  # autocast keeps FP32 weights and casts per op: no master copy
            "optimizer_state": optim,
            "activations": max(peak - start, 0) if cuda else 0,
            "other": max(start - params - grads - optim, 0) if cuda else 0,
        },
        "predicted_peak_bytes": None,
        "step_time_s": {"median": median, "min": min(times, default=median), "max": max(times, default=median)},
        "tokens_per_s": args.batch * args.seq_len / median if times else 0.0,
        "final_loss": final_loss,
        # Host <-> device traffic is not counted in PyTorch.
        "transfers_per_step": None,
        "peak_vs_baseline": None,
        "time_vs_baseline": None,
        "torch_version": torch.__version__,
        "attention": "naive" if Block.naive_attention else "sdpa",
        "tf32": tf32,
    }


def add_ratios(rows):
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["config"] == BASELINE), None)
        if base:
            row["peak_vs_baseline"] = row["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None
            row["time_vs_baseline"] = row["step_time_s"]["median"] / base["step_time_s"]["median"]


def markdown(rows):
    mib = lambda b: b / 2**20  # noqa: E731
    ratio = lambda r: "-" if r is None else f"{r:.2f}x"  # noqa: E731
    out = ["| model | config | precision | micro x accum | peak MiB | vs fp32 | params | grads | optim | activations "
           "| step ms (median, min-max) | vs fp32 | tokens/s | val loss |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c, t = r["bytes_by_category"], r["step_time_s"]
        out.append(f"| {r['model']} | {r['config']} | {r['precision']} | {r['micro_batch']} x {r['accum_steps']} "
                   f"| {mib(r['peak_bytes']):.1f} | {ratio(r['peak_vs_baseline'])} | {mib(c['parameters']):.1f} "
                   f"| {mib(c['gradients']):.1f} | {mib(c['optimizer_state']):.1f} | {mib(c['activations']):.1f} "
                   f"| {t['median'] * 1e3:.0f} ({t['min'] * 1e3:.0f}-{t['max'] * 1e3:.0f}) "
                   f"| {ratio(r['time_vs_baseline'])} | {r['tokens_per_s']:.0f} | {r['final_loss']:.4f} |")
    return "\n".join(out) + "\n"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--configs", default="all", help="comma-separated names, or all")
    p.add_argument("--layers", type=ints, default=[4])
    p.add_argument("--width", type=ints, default=[128])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", default=os.path.join(here, "..", "data", "austen", "prideprejudice.txt"))
    p.add_argument("--attention", choices=["sdpa", "naive"], default="sdpa",
                   help="sdpa: F.scaled_dot_product_attention (fused); naive: the score matrix "
                        "materialised, as candle-fit does (a like-for-like memory comparison)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration `{unknown[0]}`: known ones are {', '.join(CONFIGS)}")
    if min(args.batch, args.seq_len, args.steps) < 1:
        sys.exit("--batch, --seq-len and --steps must be at least 1")
    device = torch.device(args.device)
    Block.naive_attention = args.attention == "naive"
    with open(args.corpus, "rb") as f:
        raw = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    cut = int(len(raw) * 0.9)
    data = (raw[:cut], raw[cut:])
    rows = []
    for layers in args.layers:
        for width in args.width:
            if names:  # one discarded run: first-use costs (allocator, kernels) go there
                print(f"warming up on L{layers}-W{width} ...", file=sys.stderr)
                run_one(args, layers, width, names[0], data, device)
            for name in names:
                print(f"running {name} on L{layers}-W{width} ...", file=sys.stderr)
                rows.append(run_one(args, layers, width, name, data, device))
    add_ratios(rows)
    table = markdown(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
