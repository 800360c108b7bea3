"""bench/gpu.sh arms `mmlu`, `decode` and `dp`: the evaluation side on one device.

mmlu    questions/s of ours (`load_lm(model, dtype, device)`) and of lm-eval's `hf` backend (HFLM over
        transformers' model loaded from the same GGUF, moved to the same device, same dtype) on
        exactly the requests our MMLU task builds, 0- and 5-shot; prediction agreement and max
        |delta loglikelihood|. The pieces are bench/choice_speed.py's, so the CPU bench and this
        one measure the same thing.
decode  greedy tokens/s of models.generate.generate_tokens against transformers' generate on the
        same prompt ids (bench/generate_speed.py's prompt), and whether the tokens match.
dp      `torchrun -m harness task=mmlu ...` with N processes against one `python -m harness`
        process on the same subjects: records identical (ids, predictions, scores; log-likelihoods to 1e-4) and the
        time ratio. N = the GPU count when there are several; otherwise 2 gloo processes on the
        CPU, a correctness check whose speed-up means nothing (said in the result).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
PROMPT = "Write a short story about a robot."


def dtype_for(device: torch.device) -> str:
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def timed(fn, *a):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*a)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def mmlu(device: torch.device, subjects: list[str], limit: int | None, repeats: int) -> dict:
    import choice_speed as cs
    from models.registry import load_lm
    cs.quiet_libraries()
    dtype = dtype_for(device)
    model, tok = cs.load_anchor_parts(MODEL)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    batch = 8 if device.type == "cpu" else 32
    hflm = cs.make_hflm(model, tok, batch)
    ours = load_lm(MODEL, dtype=dtype, device=str(device), progress=False)
    out = {"model": MODEL, "dtype": dtype, "subjects": subjects, "limit": limit, "lmeval_batch_size": batch,
           "anchor": f"lm_eval {__import__('lm_eval').__version__} HFLM over transformers "
                     f"{__import__('transformers').__version__}", "settings": {}}
    for k in (0, 5):
        samples = cs.task_samples("mmlu", subjects, k, limit)
        reqs = [(s.data["context"], c) for s in samples for c in s.data["continuations"]]
        n_choices = [len(s.data["continuations"]) for s in samples]
        w = sum(n_choices[:4])                      # warm-up: kernels, allocator, autotuning
        cs.lmeval_loglikelihood(hflm, reqs[:w])
        ours.loglikelihood(reqs[:w])
        times: dict[str, list[float]] = {"ours": [], "lmeval": []}
        lls = {}
        for r in range(repeats):
            for side in (("ours", "lmeval") if r % 2 == 0 else ("lmeval", "ours")):
                fn = ours.loglikelihood if side == "ours" else (lambda q: cs.lmeval_loglikelihood(hflm, q))
                dt, ll = timed(fn, reqs)
                times[side].append(dt)
                lls.setdefault(side, ll)
        nq = len(samples)
        qps = {s: nq / statistics.median(t) for s, t in times.items()}
        p_ours, p_ref = cs.predictions(lls["ours"], n_choices), cs.predictions(lls["lmeval"], n_choices)
        agree = sum(a == b for a, b in zip(p_ours, p_ref))
        gold = [s.data["gold"] for s in samples]
        out["settings"][f"{k}-shot"] = {
            "questions": nq, "requests": len(reqs), "qps_ours": qps["ours"], "qps_lmeval": qps["lmeval"],
            "ratio": qps["ours"] / qps["lmeval"], "agreement_pct": 100 * agree / nq,
            "max_abs_delta_ll": max(abs(a - b) for a, b in zip(lls["ours"], lls["lmeval"])),
            "acc_ours": sum(p == g for p, g in zip(p_ours, gold)) / nq,
            "acc_lmeval": sum(p == g for p, g in zip(p_ref, gold)) / nq, "runs_s": times}
        print(f"  {k}-shot: ours {qps['ours']:.1f} q/s, lm-eval {qps['lmeval']:.1f} q/s, "
              f"agreement {100 * agree / nq:.1f}%", flush=True)
    return out


def decode(device: torch.device, new_tokens: int, repeats: int) -> dict:
    import transformers

    import choice_speed as cs
    from models.generate import generate_tokens
    from models.registry import load_lm
    cs.quiet_libraries()
    dtype = dtype_for(device)
    lm = load_lm(MODEL, dtype=dtype, device=str(device), progress=False)
    model, _tok = cs.load_anchor_parts(MODEL)
    model = model.to(device=device, dtype=getattr(torch, dtype))
    ids = lm.encode(lm.chat_prompt([{"role": "user", "content": PROMPT}]))
    pad = lm.tokenizer.eos_id
    x = torch.tensor([ids], device=device)

    def ours(n):
        return generate_tokens(lm.model, [ids], max_new_tokens=n, eos_ids=[])[0]

    def theirs(n):
        with torch.inference_mode():
            o = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=pad)
        return o[0, len(ids):].tolist()
    ours(8), theirs(8)                                 # warm-up
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    toks = {}
    for r in range(repeats):
        for side in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
            dt, t = timed(ours if side == "ours" else theirs, new_tokens)
            assert len(t) == new_tokens, f"{side} made {len(t)} tokens, expected {new_tokens}"
            times[side].append(dt)
            toks.setdefault(side, t)
    tps = {s: new_tokens / statistics.median(t) for s, t in times.items()}
    a, b = toks["ours"], toks["transformers"]
    first = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), None)
    print(f"  ours {tps['ours']:.1f} tok/s, transformers {tps['transformers']:.1f} tok/s, "
          f"tokens {'match' if first is None else f'differ from {first}'}", flush=True)
    return {"model": MODEL, "dtype": dtype, "prompt_tokens": len(ids), "new_tokens": new_tokens,
            "transformers": transformers.__version__, "tok_s_ours": tps["ours"],
            "tok_s_transformers": tps["transformers"], "ratio": tps["ours"] / tps["transformers"],
            "tokens_match": first is None, "first_divergence": first, "runs_s": times}


def _harness_run(launcher: list[str], args: list[str], run_dir: Path, env: dict) -> float:
    t = time.perf_counter()
    p = subprocess.run([*launcher, *args, f"hydra.run.dir={run_dir}", f"leaderboard={run_dir}.csv"],
                       cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(launcher[-3:])} exited {p.returncode}: "
                           f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return time.perf_counter() - t


def data_parallel(device: torch.device, subjects: list[str], limit: int | None) -> dict:
    n_gpu = torch.cuda.device_count() if device.type == "cuda" else 0
    multi = n_gpu > 1
    nproc, dev = (n_gpu, "cuda") if multi else (2, "cpu")
    if not multi and limit:
        limit = min(limit, 10)      # a correctness check on the CPU: a few questions per subject do
    # fp32 on both sides: records must match to 1e-4 whichever neighbours a sample is batched with
    args = ["task=mmlu", f"task.subjects=[{','.join(subjects)}]", f"model={MODEL}", f"model.device={dev}",
            "model.dtype=float32", "chunk_size=64"] + ([f"task.limit={limit}"] if limit else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not multi:                                      # 2 CPU ranks share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    py = [sys.executable, "-m"]
    with tempfile.TemporaryDirectory() as tmp:
        one_s = _harness_run(py + ["harness"], args, Path(tmp) / "one", env)
        many_s = _harness_run(py + ["torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                                    "harness"], args, Path(tmp) / "many", env)
        one, many = ([json.loads(x) for x in (Path(tmp) / d / "records.jsonl").read_text().splitlines()]
                     for d in ("one", "many"))
    same_ids = [r["sample_id"] for r in one] == [r["sample_id"] for r in many]
    same_pred = all((a["prediction"], a["target"], a["prompt_hash"]) == (b["prediction"], b["target"], b["prompt_hash"])
                    for a, b in zip(one, many))
    same_scores = all(a["scores"] == b["scores"] for a, b in zip(one, many))
    max_diff = max((abs(x - y) for a, b in zip(one, many)
                    for x, y in zip(a["extra"].get("loglikelihoods", []), b["extra"].get("loglikelihoods", []))),
                   default=0.0)
    identical = same_ids and same_pred and same_scores and len(one) == len(many) and max_diff <= 1e-4
    print(f"  {nproc} x {dev}: {len(many)} records, identical {identical}, one {one_s:.1f}s, "
          f"{nproc} procs {many_s:.1f}s", flush=True)
    return {"nproc": nproc, "device": dev, "gpus": n_gpu, "subjects": subjects, "limit": limit,
            "records": len(one), "records_identical": identical, "same_ids": same_ids,
            "same_predictions": same_pred, "same_scores": same_scores, "max_abs_delta_ll": max_diff,
            "one_process_s": one_s, "n_process_s": many_s, "speedup": one_s / many_s,
            "speedup_meaningful": multi,
            "note": None if multi else f"{'one GPU' if n_gpu == 1 else 'no GPU'}: {nproc} gloo processes "
                                       "on the CPU, a correctness check; the speed-up means nothing"}
