"""Does `compile=true` pay on this machine? Eager against compiled, same weights and inputs, per path.

    python bench/compile_speed.py [--paths score,decode] [--repeats 3]

- score:  MMLU 0-shot (context, continuation) requests, SmolLM2-135M fp32, `load_lm(...)` against
          `load_lm(..., compile=True)`: questions/s, max |delta log-likelihood|, prediction agreement.
- decode: greedy decoding of 64 tokens, SmolLM2-135M bf16 (`generate_tokens`): tokens/s, same tokens.
Training is measured where its anchor is: `python bench/train_throughput.py --compile` puts
compile=true (models.compile.compile_for_training) beside eager and transformers in one run.
The compiled side's first call (tracing and building kernels) is timed apart as compile_s and never
counted in the throughput. Arms are interleaved per repeat and medians reported; the machine is shared.
Writes bench/results/compile_speed.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_summary  # noqa: E402  (bench/ is the script's folder, first on sys.path)

from models.registry import load_lm  # noqa: E402

MODEL = "smollm2-135m-instruct"


def interleaved(arms: dict, repeats: int) -> tuple[dict, dict]:
    """{name: fn() -> result}: first (untimed-for-throughput) call of each as warm-up/compile, then
    `repeats` interleaved timed calls. Returns ({name: [seconds]}, {name: first call's seconds and result})."""
    first = {}
    for name, fn in arms.items():
        t = time.perf_counter()
        out = fn()
        first[name] = (time.perf_counter() - t, out)
        print(f"  {name}: first call {first[name][0]:.1f}s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in arms}
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
            t = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - t)
    return times, first


def summarize(times: dict, first: dict, units: float, unit: str) -> dict:
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {f"{unit}_per_s": round(units / med, 2), "runs_s": [round(t, 3) for t in ts],
                     "first_call_s": round(first[name][0], 1)}
    out["compiled_over_eager"] = round(out["compiled"][f"{unit}_per_s"] / out["eager"][f"{unit}_per_s"], 3)
    return out


def score_path(repeats: int, limit: int) -> dict:
    from choice_speed import predictions, task_samples
    samples = task_samples("mmlu", ["anatomy"], 0, limit)
    requests = [(s.data["context"], c) for s in samples for c in s.data["continuations"]]
    n_choices = [len(s.data["continuations"]) for s in samples]
    lms = {"eager": load_lm(MODEL, dtype="float32", progress=False),
           "compiled": load_lm(MODEL, dtype="float32", progress=False, compile=True)}
    times, first = interleaved({k: (lambda lm=lm: lm.loglikelihood(requests)) for k, lm in lms.items()}, repeats)
    a, b = first["eager"][1], first["compiled"][1]
    pa, pb = predictions(a, n_choices), predictions(b, n_choices)
    res = summarize(times, first, len(samples), "questions")
    res.update(questions=len(samples), max_abs_delta_ll=max(abs(x - y) for x, y in zip(a, b)),
               agreement_pct=100.0 * sum(x == y for x, y in zip(pa, pb)) / len(pa))
    return res


def decode_path(repeats: int, new_tokens: int) -> dict:
    from models.generate import generate_tokens
    lms = {"eager": load_lm(MODEL, dtype="bfloat16", progress=False),
           "compiled": load_lm(MODEL, dtype="bfloat16", progress=False, compile=True)}
    ids = lms["eager"].encode(lms["eager"].chat_prompt([{"role": "user", "content": "Write a short story about a robot."}]))
    arms = {k: (lambda lm=lm: generate_tokens(lm.model, [ids], max_new_tokens=new_tokens, eos_ids=[])[0])
            for k, lm in lms.items()}
    times, first = interleaved(arms, repeats)
    a, b = first["eager"][1], first["compiled"][1]
    res = summarize(times, first, new_tokens, "tokens")
    res.update(new_tokens=new_tokens, same_tokens=a == b,
               first_divergence=next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default="score,decode")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=40, help="MMLU anatomy questions (score)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "bench/results/compile_speed.json"))
    args = ap.parse_args()
    summary = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "paths": {}}
    run = {"score": lambda: score_path(args.repeats, args.limit),
           "decode": lambda: decode_path(args.repeats, args.new_tokens)}
    for path in args.paths.split(","):
        print(f"[{path}]", flush=True)
        summary["paths"][path] = res = run[path]()
        print(f"  compiled / eager: {res['compiled_over_eager']:.2f}x  "
              f"({ {k: v for k, v in res.items() if k not in ('eager', 'compiled')} })", flush=True)
    summary["load_avg_at_end"] = os.getloadavg()
    print(f"wrote {write_summary(args.out, summary)}")


if __name__ == "__main__":
    main()
