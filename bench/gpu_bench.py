"""The driver behind bench/gpu.sh: one arm per call (`--arm`), each writing one JSON part, then
`--collect` merges the parts into one results file and prints the table.

    python bench/gpu_bench.py --arm train --part /tmp/p/train.json [--device auto] [--smoke]
    python bench/gpu_bench.py --collect /tmp/p --out bench/results/gpu.json [--device ...] [--smoke]

Why one process per arm: a GPU run gets one go of under ten minutes, so an arm that hangs, runs out
of memory or crashes in a compiler must cost only its own figures. gpu.sh gives each arm a timeout;
here each arm catches its own failure and checks what it needs first (Python packages, the GGUF
model, the MMLU files: the device machine has its own Python and neither the ../shared folder nor
the network), so a missing piece is one `skipped: ...` line, not a traceback.
Arms: train (bench/gpu_train.py), mmlu, decode, dp (bench/gpu_eval.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # anchors must never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("train", "mmlu", "decode", "dp")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"            # models/registry.py's smollm2-135m-instruct
SUBJECTS = {False: ["abstract_algebra", "anatomy", "astronomy", "college_biology"], True: ["anatomy"]}
# what each arm imports beyond torch (module names); the harness itself needs the first group
HARNESS_MODULES = ["yaml", "numpy", "gguf", "tiktoken", "tokenizers", "omegaconf", "jinja2", "tqdm"]
NEEDS = {"train": ["yaml", "numpy", "omegaconf", "tqdm"],
         "mmlu": HARNESS_MODULES + ["transformers", "lm_eval"],
         "decode": HARNESS_MODULES + ["transformers"],
         "dp": HARNESS_MODULES + ["hydra", "pandas"]}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a dry run of every code path")
    ap.add_argument("--arm", choices=ARMS, help="run this one arm and write --part")
    ap.add_argument("--part", help="JSON file the arm writes")
    ap.add_argument("--collect", help="folder of parts to merge into --out and print")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms, in table order")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu.json"))
    ap.add_argument("--data", default=os.environ.get("HARNESS_DATA", ""), help="HARNESS_DATA (mmlu/ inside)")
    ap.add_argument("--models", default=os.environ.get("HARNESS_MODELS", ""), help=f"HARNESS_MODELS ({GGUF})")
    ap.add_argument("--batch", type=int, help="train: batch (default 16; 2 on --smoke)")
    ap.add_argument("--context", type=int, help="train: context (default 1024; 64 on --smoke)")
    ap.add_argument("--steps", type=int, help="train: timed steps per round (default 20; 2 on --smoke)")
    ap.add_argument("--no-compile", action="store_true", help="train: eager, no torch.compile")
    args = ap.parse_args(argv)
    if args.arm and not args.part:
        ap.error("--arm needs --part")
    if args.arm and args.collect:
        ap.error("--arm and --collect are two different calls")
    bad = [a for a in args.arms.split(",") if a not in ARMS]
    if bad:
        ap.error(f"unknown arm(s) {','.join(bad)}; choose from {','.join(ARMS)}")
    return args


def resolve_device(name: str):
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}, but torch {torch.__version__} sees no CUDA device")
    return torch.device(name)


def missing(arm: str, args) -> str | None:
    """Why the arm cannot run here, or None."""
    mods = [m for m in NEEDS[arm] if importlib.util.find_spec(m) is None]
    if mods:
        return f"Python package(s) {', '.join(mods)} not installed (carry wheels in .whl/, bench/README.md)"
    if arm == "train":
        return None
    gguf = Path(args.models or "~/.cache/harness/models").expanduser() / GGUF
    if not gguf.is_file():
        return f"{gguf} not found (--models / HARNESS_MODELS)"
    if arm in ("mmlu", "dp"):
        root = Path(args.data or "~/.cache/harness/data").expanduser() / "mmlu"
        need = [root / split / f"{s}_{split}.csv" for s in SUBJECTS[args.smoke] for split in ("test", "dev")]
        lacking = [str(p) for p in need if not p.is_file()]
        if lacking:
            return f"MMLU file(s) not found: {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''} (--data)"
    return None


def run_arm(arm: str, args) -> dict:
    for var, val in (("HARNESS_DATA", args.data), ("HARNESS_MODELS", args.models)):
        if val:
            os.environ[var] = str(Path(val).expanduser().resolve())
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
    t = time.perf_counter()
    rec: dict = {"arm": arm}
    why = missing(arm, args)
    if why:
        rec["status"] = f"skipped: {why}"
        return rec
    try:
        device = resolve_device(args.device)
        rec["device"] = str(device)
        if arm == "train":
            import gpu_train
            rec["result"] = gpu_train.run(device, args.smoke, args.batch, args.context,
                                          args.steps or (2 if args.smoke else 20), not args.no_compile)
        else:
            import gpu_eval
            subjects, limit = SUBJECTS[args.smoke], (6 if args.smoke else None)
            if arm == "mmlu":
                rec["result"] = gpu_eval.mmlu(device, subjects, limit, 1 if args.smoke else 2)
            elif arm == "decode":
                rec["result"] = gpu_eval.decode(device, 16 if args.smoke else 256, 2 if args.smoke else 3)
            else:
                rec["result"] = gpu_eval.data_parallel(device, subjects, 4 if args.smoke else 40)
        rec["status"] = "ok"
    except Exception as e:   # an arm's failure is its own line in the table, never the run's end
        traceback.print_exc()
        last = str(e).strip().splitlines()[-1:] or [""]
        rec["status"] = f"failed: {type(e).__name__}: {last[0][:300]}"
    rec["seconds"] = round(time.perf_counter() - t, 1)
    return rec


def machine() -> dict:
    import torch
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "gpus": torch.cuda.device_count() if cuda else 0,
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "host": platform.machine()}


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def summary_line(rec: dict) -> str:
    r = rec.get("result")
    if rec["status"] != "ok" or r is None:
        return rec["status"]
    if rec["arm"] == "train":
        o, n = r["results"]["ours"], r["results"]["nanogpt"]
        goal = "" if r["goal_met"] is None else f"; goal MFU >= {pct(r['goal_mfu_nominal'])}: " \
                                                 f"{'MET' if r['goal_met'] else 'MISSED'}"
        return (f"{r['model']} B{r['batch']}xT{r['context']}: ours {o['tokens_per_s']:,.0f} tok/s "
                f"(MFU {pct(o['mfu_nominal'])} nominal, {pct(o['mfu_measured'])} of measured mm), "
                f"nanoGPT {n['tokens_per_s']:,.0f} tok/s (MFU {pct(n['mfu_nominal'])} / {pct(n['mfu_measured'])}); "
                f"ours/nanoGPT {r['ours_over_nanogpt']:.2f}x{goal}" + (
                    f"; compile=true path (blocks compiled, loss eager) {r['compile_flag_over_nanogpt']:.2f}x nanoGPT"
                    if "compile_flag_over_nanogpt" in r else ""))
    if rec["arm"] == "mmlu":
        return f"{r['dtype']}: " + "; ".join(
            f"{k} {s['questions']}q ours {s['qps_ours']:.1f} q/s vs lm-eval {s['qps_lmeval']:.1f} "
            f"({s['ratio']:.2f}x), agree {s['agreement_pct']:.1f}%" for k, s in r["settings"].items())
    if rec["arm"] == "decode":
        return (f"{r['dtype']}, {r['new_tokens']} tokens: ours {r['tok_s_ours']:.1f} tok/s vs transformers "
                f"{r['tok_s_transformers']:.1f} ({r['ratio']:.2f}x), tokens "
                f"{'match' if r['tokens_match'] else 'differ from #%s' % r['first_divergence']}")
    return (f"{r['nproc']} x {r['device']} vs 1 process, {r['records']} records: identical "
            f"{'YES' if r['records_identical'] else 'NO'}, speed-up {r['speedup']:.2f}x"
            + ("" if r["speedup_meaningful"] else f" ({r['note']})"))


def collect(args) -> int:
    parts = {p.stem: json.loads(p.read_text()) for p in Path(args.collect).glob("*.json")}
    arms = args.arms.split(",")
    records = [parts.get(a, {"arm": a, "status": "failed: no result written (see the log)"}) for a in arms]
    out = {"bench": "gpu", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke,
           "device_arg": args.device, "machine": machine(), "arms": records}
    if not out["machine"]["gpus"]:
        out["note"] = "no GPU: a CPU dry run of the code paths; none of these figures is a GPU figure"
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    m = out["machine"]
    print(f"\n== bench/gpu.sh {'--smoke ' if args.smoke else ''}on {m['gpu'] or 'CPU'} "
          f"({m['gpus']} GPU(s), {m['cpus']} CPUs, torch {m['torch']}, Python {m['python']}) ==")
    for rec in records:
        secs = f"{rec['seconds']:.0f}s" if "seconds" in rec else ""
        print(f"{rec['arm']:<7}{secs:>6}  {summary_line(rec)}")
    if "note" in out:
        print(out["note"])
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    if args.collect:
        return collect(args)
    if not args.arm:
        print("nothing to do: give --arm ARM --part FILE, or --collect DIR (bench/gpu.sh runs both)")
        return 2
    rec = run_arm(args.arm, args)
    Path(args.part).parent.mkdir(parents=True, exist_ok=True)
    Path(args.part).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"[{args.arm}] {rec['status']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
