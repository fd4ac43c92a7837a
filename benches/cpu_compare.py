#!/usr/bin/env python3
"""candle-fit against PyTorch eager on the CPU: step time of the same GPT, batch, AdamW and
clipping, interleaved run by run, median/min/max over rounds (BENCHMARKS.md section 14).

Every round runs, for each shape and configuration, each candle-fit binary given with
`--candle LABEL=PATH` (`candle-fit bench`, one configuration per process) and then
`benches/pytorch_reference.py` (score matrix materialised, as candle-fit does), each as a fresh
process with the same thread count (`RAYON_NUM_THREADS`, `OMP_NUM_THREADS`,
`torch.set_num_threads` through `OMP_NUM_THREADS`). A run's figure is the median step time of
its measured steps; the table gives, per runner, the median, min and max of those figures over
the rounds, and the ratio of the medians to PyTorch's. The 1-minute load average is recorded
before every run: on a shared machine, compare only figures taken side by side.

usage (from the repository root; torch installed for python3, never in CI):
  cargo build --release
  python3 benches/cpu_compare.py --candle after=$CARGO_TARGET_DIR/release/candle-fit \\
      --rounds 3 --json cpu-compare.json --markdown cpu-compare.md
  # before/after in one run: add --candle before=/path/to/old/candle-fit
  # the CPU runtime settings off (src/main.rs): add --candle plain=off:/path/to/candle-fit
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # name: (layers, width, batch, seq_len)
    "L4-W128": (4, 128, 16, 128),
    "L8-W256": (8, 256, 8, 128),
}
CONFIGS = ["fp32", "recompute-all", "bf16"]


def load():
    return os.getloadavg()[0]


def run_candle(path, shape, config, args, env):
    layers, width, batch, seq = SHAPES[shape]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [path, "bench", "--layers", str(layers), "--width", str(width), "--batch", str(batch),
               "--seq-len", str(seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--configs", config, "--json", out]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            rows = json.load(f)
    row = next(r for r in rows if r["config"] == config)
    return row["step_time_s"], row.get("peak_bytes")


def run_torch(shape, config, args, env):
    layers, width, batch, seq = SHAPES[shape]
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.join(here, "pytorch_reference.py"), "--device", "cpu",
               "--attention", "naive", "--layers", str(layers), "--width", str(width),
               "--batch", str(batch), "--seq-len", str(seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--configs", config, "--json", out]
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(out) as f:
            rows = json.load(f)
    row = next(r for r in rows if r["config"] == config)
    return row["step_time_s"], None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candle", action="append", required=True,
                   help="LABEL=PATH of a candle-fit binary (repeatable); PATH may start with "
                        "`off:` to run it with CANDLE_FIT_CPU_RUNTIME=off")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="candle-fit binaries only")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    if args.rounds < 3:
        sys.exit("--rounds must be at least 3 (median, min and max over rounds)")
    runners = []
    for spec in args.candle:
        label, _, path = spec.partition("=")
        off = path.startswith("off:")
        runners.append((label, path[4:] if off else path, off))
    shapes = args.shapes.split(",")
    configs = args.configs.split(",")
    base_env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                    MKL_NUM_THREADS=str(args.threads))
    results = {}  # (shape, config, runner) -> list of per-run records
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for rnd in range(args.rounds):
        for shape in shapes:
            for config in configs:
                order = [r[0] for r in runners] + ([] if args.no_torch else ["pytorch"])
                # Rotate the order every round so no runner always goes first.
                order = order[rnd % len(order):] + order[:rnd % len(order)]
                for label in order:
                    before = load()
                    if label == "pytorch":
                        times, peak = run_torch(shape, config, args, base_env)
                    else:
                        _, path, off = next(r for r in runners if r[0] == label)
                        env = dict(base_env, CANDLE_FIT_CPU_RUNTIME="off") if off else base_env
                        times, peak = run_candle(path, shape, config, args, env)
                    rec = {"round": rnd, "median_s": times["median"], "min_s": times["min"],
                           "max_s": times["max"], "peak_bytes": peak, "load_before": before, "load_after": load()}
                    results.setdefault((shape, config, label), []).append(rec)
                    print(f"round {rnd} {shape} {config} {label}: {times['median'] * 1e3:.0f} ms "
                          f"(load {before:.2f})", file=sys.stderr, flush=True)
    labels = [r[0] for r in runners] + ([] if args.no_torch else ["pytorch"])
    lines = [f"Run started {started}; {args.rounds} rounds, {args.steps} measured steps after "
             f"{args.warmup} warm-up per run, {args.threads} threads; figures are the median (min-max) "
             "over rounds of each run's median step time, in ms.", "",
             "| shape | config | " + " | ".join(labels) + " | " +
             " | ".join(f"{l} / pytorch" for l in labels if l != "pytorch") + " | load (min-max) |",
             "|---|---|" + "---:|" * (2 * len(labels) - (0 if args.no_torch else 1)) + "---|"]
    out_rows = []
    for shape in shapes:
        for config in configs:
            medians, cells, loads = {}, [], []
            for label in labels:
                recs = results[(shape, config, label)]
                figures = [r["median_s"] for r in recs]
                loads += [r["load_before"] for r in recs]
                medians[label] = statistics.median(figures)
                cells.append(f"{medians[label] * 1e3:.0f} ({min(figures) * 1e3:.0f}-{max(figures) * 1e3:.0f})")
                out_rows.append({"shape": shape, "config": config, "runner": label, "runs": recs,
                                 "median_s": medians[label], "min_s": min(figures), "max_s": max(figures)})
            ratios = [] if args.no_torch else [
                f"{medians[l] / medians['pytorch']:.2f}x" for l in labels if l != "pytorch"]
            lines.append(f"| {shape} | {config} | " + " | ".join(cells) + " | " + " | ".join(ratios) +
                         f" | {min(loads):.2f}-{max(loads):.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started, "threads": args.threads, "rows": out_rows}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
