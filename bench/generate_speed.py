"""Greedy decoding speed (tokens/s, KV cache) of our SmolLM2-135M against transformers' `generate`.

Both sides decode the same prompt ids (our chat template around "Write a short story about a
robot.") for exactly 128 new tokens, greedy, EOS ignored:
  ours          models.generate.generate_tokens(lm.model, [ids], max_new_tokens=128, eos_ids=[])
  transformers  model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
(transformers' model is loaded from the same GGUF file, dequantized to fp32, then cast for bf16).
tokens/s = 128 / wall time of the call (prefill of the short prompt included, for both sides).

Decoding one sequence is bound by reading every weight once per token, so the same run measures
the memory read bandwidth (torch.sum over a 512 MB fp32 tensor; and a copy, counted as read +
write bytes) and prints the weight-read limit: bandwidth / parameter bytes per token.

Everything runs interleaved (bandwidth, ours, transformers, per dtype, per repeat) in one process and
medians are reported, because the machine is shared. Run:  python bench/generate_speed.py
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the anchor must never reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_summary  # noqa: E402  (bench/ is the script's folder, first on sys.path)

from models.generate import generate_tokens  # noqa: E402
from models.registry import DTYPES, load_lm  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a robot."
# The issue's statement: ~46 GB/s here, i.e. about 38 tokens/s fp32 and 76 bf16 at the limit;
# the target is >= 85% of that limit in each dtype (transformers generate reaches 23 tokens/s fp32).
ISSUE_LIMIT = {"float32": 38.0, "bfloat16": 76.0}
TARGET_FRACTION = 0.85


def models_dir() -> Path:
    return Path(os.environ.get("HARNESS_MODELS", Path.home() / ".cache/harness/models"))


def load_transformers(dtypes: list[str]):
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = models_dir() / GGUF
    if not path.exists():
        sys.exit(f"error: {path} not found (set HARNESS_MODELS)")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()
    out = {}
    for d in dtypes:
        out[d] = base if DTYPES[d] == torch.float32 else copy.deepcopy(base).to(DTYPES[d]).eval()
    return out


def weight_bytes(params, emb: torch.Tensor, head: torch.Tensor) -> int:
    """Parameter bytes read per decoded token: every weight once. The vocabulary head is read in
    full; the input embedding lookup reads one row, so a separate embedding table (our fp32 layout
    keeps an [in, out] copy of the tied matrix as the head) counts one row only. Tied = one tensor."""
    seen, total = set(), 0
    for p in params:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    if emb.data_ptr() != head.data_ptr():
        total -= (emb.shape[0] - 1) * emb.shape[1] * emb.element_size()
    return total


def ours_weight_bytes(model) -> int:
    head = model.tok_emb.weight if model.head is None else model.head.weight
    return weight_bytes(model.parameters(), model.tok_emb.weight, head)


def hf_weight_bytes(model) -> int:
    return weight_bytes(model.parameters(), model.get_input_embeddings().weight,
                        model.get_output_embeddings().weight)


def bandwidth(src: torch.Tensor, dst: torch.Tensor) -> tuple[float, float]:
    """(GB/s reading with torch.sum, GB/s of a copy counting read + write bytes)."""
    nbytes = src.numel() * src.element_size()
    t = time.perf_counter()
    src.sum()
    t_sum = time.perf_counter() - t
    t = time.perf_counter()
    dst.copy_(src)
    t_copy = time.perf_counter() - t
    return nbytes / t_sum / 1e9, 2 * nbytes / t_copy / 1e9


def ours_generate(lm, ids: list[int], n: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    out = generate_tokens(lm.model, [ids], max_new_tokens=n, eos_ids=[])[0]
    dt = time.perf_counter() - t
    assert len(out) == n, f"ours produced {len(out)} tokens, expected {n}"
    return dt, out


def hf_generate(model, ids: list[int], n: int, pad_id: int) -> tuple[float, list[int]]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad_id)
        dt = time.perf_counter() - t
    new = out[0, len(ids):].tolist()
    assert len(new) == n, f"transformers produced {len(new)} tokens, expected {n}"
    return dt, new


def pf(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per side (>= 3; medians)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--bandwidth-mb", type=int, default=512, help="size of the fp32 tensor for the bandwidth probe")
    ap.add_argument("--out", default=str(ROOT / "bench/results/generate_speed.json"))
    args = ap.parse_args()
    n = args.new_tokens

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"cpus {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    ours = {d: load_lm("smollm2-135m-instruct", dtype=d, progress=False) for d in args.dtypes}
    theirs = load_transformers(args.dtypes)
    lm0 = next(iter(ours.values()))
    ids = lm0.encode(lm0.chat_prompt([{"role": "user", "content": PROMPT}]))
    pad_id = lm0.tokenizer.eos_id
    print(f"loaded in {time.perf_counter() - t0:.1f}s; prompt {len(ids)} tokens, {n} new tokens, "
          f"{args.repeats} interleaved repeats", flush=True)

    wbytes = {d: ours_weight_bytes(ours[d].model) for d in args.dtypes}
    hf_wbytes = {d: hf_weight_bytes(theirs[d]) for d in args.dtypes}

    numel = args.bandwidth_mb * 2**20 // 4
    src = torch.rand(numel, dtype=torch.float32)
    dst = torch.empty_like(src)
    bandwidth(src, dst)                                   # first touch of both buffers

    # warm-up: one short untimed call per side and dtype
    for d in args.dtypes:
        ours_generate(ours[d], ids, 8)
        hf_generate(theirs[d], ids, 8, pad_id)

    times: dict[str, dict[str, list[float]]] = {d: {"ours": [], "transformers": []} for d in args.dtypes}
    bw_sum, bw_copy = [], []
    tokens: dict[str, dict[str, list[int]]] = {d: {} for d in args.dtypes}
    for r in range(args.repeats):
        s, c = bandwidth(src, dst)
        bw_sum.append(s)
        bw_copy.append(c)
        for d in args.dtypes:
            order = ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")
            for side in order:
                if side == "ours":
                    dt, toks = ours_generate(ours[d], ids, n)
                else:
                    dt, toks = hf_generate(theirs[d], ids, n, pad_id)
                times[d][side].append(dt)
                tokens[d].setdefault(side, toks)
                if toks != tokens[d][side]:
                    print(f"  warning: {side} {d} tokens changed between repeats", flush=True)
        print(f"  repeat {r + 1}: bw sum {s:.1f} GB/s copy {c:.1f} GB/s; " + "; ".join(
            f"{d} ours {n / times[d]['ours'][-1]:.1f} tf {n / times[d]['transformers'][-1]:.1f} tok/s"
            for d in args.dtypes), flush=True)
    del src, dst

    bw_s, bw_c = statistics.median(bw_sum), statistics.median(bw_copy)
    print(f"\nmemory bandwidth (median of {args.repeats}): torch.sum read {bw_s:.1f} GB/s, "
          f"copy (read+write) {bw_c:.1f} GB/s")
    summary = {
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine()},
        "prompt_tokens": len(ids), "new_tokens": n, "repeats": args.repeats,
        "bandwidth_gbps": {"sum_read_median": bw_s, "copy_rw_median": bw_c, "sum_read_all": bw_sum,
                           "copy_rw_all": bw_copy},
        "issue_limits_tok_s": ISSUE_LIMIT, "target_fraction_of_issue_limit": TARGET_FRACTION,
        "dtypes": {},
    }
    all_pass = True
    for d in args.dtypes:
        o = n / statistics.median(times[d]["ours"])
        t = n / statistics.median(times[d]["transformers"])
        limit_sum = bw_s * 1e9 / wbytes[d]
        limit_copy = bw_c * 1e9 / wbytes[d]
        issue = ISSUE_LIMIT[d]
        ok = o >= TARGET_FRACTION * issue
        all_pass &= ok
        print(f"\n[{d}] weights read per token: ours {wbytes[d] / 1e6:.1f} MB "
              f"(transformers {hf_wbytes[d] / 1e6:.1f} MB)")
        print(f"  ours          {o:7.2f} tokens/s   (runs: {', '.join(f'{n / x:.1f}' for x in times[d]['ours'])})")
        print(f"  transformers  {t:7.2f} tokens/s   (runs: {', '.join(f'{n / x:.1f}' for x in times[d]['transformers'])})")
        print(f"  ratio ours / transformers: {o / t:.2f}x")
        print(f"  weight-read limit from measured bandwidth: {limit_sum:.1f} tok/s (sum) / {limit_copy:.1f} tok/s "
              f"(copy); ours = {100 * o / limit_sum:.0f}% / {100 * o / limit_copy:.0f}% of it")
        print(f"  issue's stated limit {issue:.0f} tok/s: ours = {100 * o / issue:.0f}%  "
              f"target >= {100 * TARGET_FRACTION:.0f}% ({TARGET_FRACTION * issue:.1f} tok/s): {pf(ok)}")
        entry = {
            "ours_tok_s": o, "transformers_tok_s": t, "ratio": o / t,
            "ours_runs_s": times[d]["ours"], "transformers_runs_s": times[d]["transformers"],
            "weight_bytes_per_token": wbytes[d],
            "limit_tok_s_from_sum_bw": limit_sum, "limit_tok_s_from_copy_bw": limit_copy,
            "pct_of_measured_limit_sum": 100 * o / limit_sum, "pct_of_issue_limit": 100 * o / issue,
            "target": f">= {TARGET_FRACTION:.0%} of {issue:.0f} tok/s", "pass": ok,
        }
        a, b = tokens[d]["ours"], tokens[d]["transformers"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        entry["greedy_tokens_match"] = first is None
        entry["first_divergence"] = first
        if first is None:
            print(f"  greedy tokens ours vs transformers: identical ({n} tokens)")
        else:
            print(f"  greedy tokens ours vs transformers: differ first at new token {first} "
                  f"(ours {a[first]} {lm0.tokenizer.decode([a[first]])!r}, transformers {b[first]} "
                  f"{lm0.tokenizer.decode([b[first]])!r}; {sum(x == y for x, y in zip(a, b))}/{n} positions equal)")
        summary["dtypes"][d] = entry
    if "float32" in args.dtypes:
        print(f"\nfp32 greedy tokens equal to transformers': "
              f"{'YES' if summary['dtypes']['float32']['greedy_tokens_match'] else 'NO'}")
    print(f"overall: {pf(all_pass)}")
    print("ours fp32 text:", repr(lm0.tokenizer.decode(tokens[args.dtypes[0]]["ours"])[:200]))

    out = write_summary(args.out, summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
