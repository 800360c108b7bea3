"""GSM8K 5-shot generation, problems/s: our `task=gsm8k` path against lm-eval's `hf` backend.

Issue 15's performance target: >= 2x lm-eval's hf backend in problems/s with identical text.
Both sides generate for the first N test problems (`--limit`, default 20), 5-shot `first_n`,
greedy, lm-eval's stops and 256 new tokens at most, on SmolLM2-135M-Instruct from the same GGUF:
  ours     GenerativeTask.score on TorchLM (load_lm, fp32), what `python -m harness task=gsm8k` runs
  lm-eval  HFLM.generate_until over lm-eval's own gsm8k task's requests (built offline by
           tests/test_generative.py's helpers), transformers' model dequantized to fp32, with the
           settings a user gets: batch size 1, lm-eval's CLI default (`--anchor-batch` to change)
The prompts are checked equal first; the generations are compared string by string and every
difference is counted and listed (never hidden): PASS needs the ratio AND identical text.
Runs are interleaved (the order alternating) after a warm-up of both sides on two problems, and
medians reported, because the machine is shared. Run:  python bench/gsm8k_speed.py [--limit 20]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the anchor must never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))               # the parity test's helpers build lm-eval's task

from choice_speed import DEFAULT_MODEL, load_anchor_parts, quiet_libraries, timed  # noqa: E402
from common import write_summary  # noqa: E402  (bench/ is the script's folder, first on sys.path)
from test_generative import lm_eval_gsm8k, our_task  # noqa: E402

from models.registry import load_lm  # noqa: E402

TARGET = 2.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=20, help="the first N GSM8K test problems")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side")
    ap.add_argument("--anchor-batch", type=int, default=1, help="HFLM batch_size (lm-eval's CLI default: 1)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gsm8k_speed.json"))
    args = ap.parse_args()
    quiet_libraries()
    from lm_eval.models.huggingface import HFLM

    task = our_task("gsm8k", limit=args.limit, fewshot_sampler="first_n")
    samples = task.samples()
    _, instances = lm_eval_gsm8k(args.limit, "first_n")
    if [s.data["prompt"] for s in samples] != [i.args[0] for i in instances]:
        sys.exit("error: our prompts differ from lm-eval's gsm8k requests; fix that first (tests/test_generative.py)")
    ours = load_lm(DEFAULT_MODEL, progress=False)
    model, tok = load_anchor_parts(DEFAULT_MODEL)
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.anchor_batch, device="cpu")
    sides = {"ours": lambda n: [r.extra["generations"][0] for r in task.score(ours, samples[:n])],
             "lmeval": lambda n: hflm.generate_until(instances[:n], disable_tqdm=True)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load avg "
          f"{os.getloadavg()[0]:.2f}; {args.limit} problems, lm-eval batch {args.anchor_batch}", flush=True)
    for fn in sides.values():
        fn(min(2, args.limit))                                         # warm-up
    times: dict[str, list[float]] = {"ours": [], "lmeval": []}
    texts: dict[str, list[str]] = {}
    for r in range(args.repeats):
        for side in (("ours", "lmeval") if r % 2 == 0 else ("lmeval", "ours")):
            dt, out = timed(sides[side], args.limit)
            times[side].append(dt)
            texts.setdefault(side, out)
            print(f"  run {r + 1} {side}: {dt:.1f}s", flush=True)
    pps = {side: args.limit / statistics.median(ts) for side, ts in times.items()}
    ratio = pps["ours"] / pps["lmeval"]
    differ = [k for k, (a, b) in enumerate(zip(texts["ours"], texts["lmeval"])) if a != b]
    verdict = "PASS" if ratio >= TARGET and not differ else "MISS"
    for k in differ:
        print(f"  problem {k} differs:\n    ours:    {texts['ours'][k]!r}\n    lm-eval: {texts['lmeval'][k]!r}")
    print(f"GSM8K 5-shot first_n, {args.limit} problems: ours {pps['ours']:.3f} problems/s, lm-eval hf "
          f"{pps['lmeval']:.3f} problems/s -> {ratio:.2f}x (target >= {TARGET:g}x: {verdict}); "
          f"generations identical {args.limit - len(differ)}/{args.limit}; load avg {os.getloadavg()[0]:.2f}")
    summary = {"model": DEFAULT_MODEL, "dtype": "float32", "problems": args.limit, "fewshot": "5-shot first_n",
               "anchor_batch_size": args.anchor_batch, "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "load_avg_end": os.getloadavg(),
               "runs_s": times, "problems_per_s": pps, "ratio": ratio, "target": TARGET, "verdict": verdict,
               "identical": f"{args.limit - len(differ)}/{args.limit}", "differ": differ,
               "generated_chars": {side: sum(map(len, t)) for side, t in texts.items()}}
    print(f"wrote {write_summary(args.out, summary)}")


if __name__ == "__main__":
    main()
