"""Small pieces the loop and the recipes share: distributed rank, device moves, the optimizer and
its schedule, and the signal flag that turns SIGTERM/SIGINT into a checkpoint."""
from __future__ import annotations

import math
import signal

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def first_numel(batch) -> int:
    return (batch if isinstance(batch, torch.Tensor) else next(iter(batch.values() if isinstance(batch, dict) else batch))).numel()


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    return batch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, s, device: torch.device) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    try:  # fused: one kernel for the whole update (CUDA, and CPU since torch 2.4)
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, foreach=True)


class LossModule(torch.nn.Module):
    """What DDP wraps: forward(batch) = loss_fn(model, batch)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


class Signals:
    """SIGTERM/SIGINT set a flag the loop checks after each step; a second SIGINT interrupts."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def restore(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


def report(bar, row: dict, evaluated: bool, step: int) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    write = bar.write if bar is not None else print
    if evaluated:
        val = "n/a" if row.get("val_loss") is None else f"{row['val_loss']:.3f}"
        write(f"step {step}: train loss {row['train_loss_avg']:.3f}, val loss {val}")
    if "sample" in row:
        write(f"step {step} sample: {row['sample']!r}")
