"""Training throughput: our GPT-2 124M training step vs transformers' GPT2LMHeadModel at its fastest.

    python bench/train_throughput.py [--rounds 3] [--steps 3] [--dtypes fp32,bf16] [--slow] [--compile]

Both models: GPT-2 124M config, context 256, batch 4, dropout 0, fused AdamW, gradient clipping,
the same loss (harness.train.pretrain.lm_loss on the logits); transformers uses sdpa attention.
The step is the training loop's: forward + loss under the autocast of the dtype, backward, clip,
AdamW step, zero_grad. Arms are interleaved round by round (machine load drifts); we report medians,
ours/theirs ratios, and model-FLOPs utilisation against this machine's measured matmul peak
(a large torch.mm in the same dtype). --slow adds transformers with its default dropout 0.1 and
eager attention, what an untuned setup gets; --compile adds ours with compile=true (each block
compiled by models.compile; compilation happens in the untimed warm-up). Writes bench/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from harness.train.common import make_optimizer
from harness.train.loop import TrainSettings
from harness.train.pretrain import lm_loss
from models.checkpoint import build_model
from models.compile import compile_for_training
from models.gpt import GPT_CONFIGS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large square matmul: the practical peak a training step could reach."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


class HFWrapper(torch.nn.Module):
    """transformers' model behind our forward(tokens) -> logits, so both share lm_loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(input_ids=tokens, use_cache=False).logits


def hf_gpt2(context: int, fast: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    p = 0.0 if fast else 0.1
    cfg = GPT2Config(n_positions=context, n_embd=768, n_layer=12, n_head=12, resid_pdrop=p, embd_pdrop=p,
                     attn_pdrop=p, use_cache=False)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa" if fast else "eager")
    assert model.config._attn_implementation == ("sdpa" if fast else "eager")
    return HFWrapper(model)


def flops_per_token(model: torch.nn.Module, n_layers: int, d_model: int, context: int) -> float:
    """6 N (N without position embeddings; the tied vocabulary head counts once) + attention 12 L d T."""
    n = sum(p.numel() for name, p in model.named_parameters() if "pos_emb" not in name and "wpe" not in name)
    return 6 * n + 12 * n_layers * d_model * context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--slow", action="store_true", help="also time transformers with dropout 0.1 + eager attention")
    ap.add_argument("--compile", action="store_true",
                    help="also time ours with compile=true (models.compile.compile_for_training; compiled in the warm-up)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    B, T = args.batch, args.context
    cfg = GPT_CONFIGS["gpt2-124m"]
    arms = {"ours": build_model("gpt", {**cfg, "context_length": T, "dropout": 0.0}),
            "transformers": hf_gpt2(T, fast=True)}
    if args.slow:
        arms["transformers-default"] = hf_gpt2(T, fast=False)
    if args.compile:   # the same initial weights as ours
        arms["ours+compile"] = build_model("gpt", {**cfg, "context_length": T, "dropout": 0.0})
        arms["ours+compile"].load_state_dict(arms["ours"].state_dict())
        compile_for_training(arms["ours+compile"])
    fpt = flops_per_token(arms["ours"], cfg["n_layers"], cfg["d_model"], T)
    settings = TrainSettings(lr=4e-4, weight_decay=0.1)
    opts = {k: make_optimizer(m, settings, torch.device("cpu")) for k, m in arms.items()}
    x, y = torch.randint(0, 50257, (B, T)), torch.randint(0, 50257, (B, T))
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    peaks = {d: matmul_peak(DTYPES[d]) for d in dtypes}

    def step(name: str, dtype: str) -> None:
        model, opt = arms[name], opts[name]
        with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext():
            loss = lm_loss(model, (x, y))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in arms:           # warm-up: allocator, oneDNN kernels, optimizer state
        for d in dtypes:
            step(name, d)
    times: dict[tuple[str, str], list[float]] = {(n, d): [] for n in arms for d in dtypes}
    for r in range(args.rounds):
        for d in dtypes:
            for name in arms:
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step(name, d)
                    times[(name, d)].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    results = []
    for (name, d), ts in times.items():
        sec = statistics.median(ts)
        tok_s = B * T / sec
        results.append({"model": name, "dtype": d, "tokens_per_s": round(tok_s, 1), "step_s": round(sec, 3),
                        "mfu": round(tok_s * fpt / peaks[d], 4), "steps_timed": len(ts)})
    by = {(r["model"], r["dtype"]): r for r in results}
    print(f"\nGPT-2 124M training step, batch {B} x context {T}, {torch.get_num_threads()} threads, "
          f"{fpt / 1e9:.3f} GFLOP/token")
    for d in dtypes:
        print(f"  matmul peak {d}: {peaks[d] / 1e9:.1f} GFLOP/s")
    print(f"{'model':<22}{'dtype':<6}{'tokens/s':>10}{'s/step':>9}{'MFU':>8}{'ours/it':>9}"
          + (f"{'compiled/it':>13}" if args.compile else ""))
    for r in results:
        ratio = by[("ours", r["dtype"])]["tokens_per_s"] / r["tokens_per_s"]
        r["ours_over_this"] = round(ratio, 3)
        extra = ""
        if args.compile:
            r["ours_compiled_over_this"] = c = round(by[("ours+compile", r["dtype"])]["tokens_per_s"] / r["tokens_per_s"], 3)
            extra = f"{c:>12.2f}x"
        print(f"{r['model']:<22}{r['dtype']:<6}{r['tokens_per_s']:>10.1f}{r['step_s']:>9.3f}"
              f"{100 * r['mfu']:>7.1f}%{ratio:>8.2f}x{extra}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "train_throughput", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "batch": B, "context": T,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "flops_per_token": fpt,
        "matmul_peak_flops": peaks, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
