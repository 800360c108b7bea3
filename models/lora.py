"""LoRA (Hu et al. 2021) for nn.Linear: y = W x + b + (alpha / rank) * B A x, with W frozen.

A starts random (Kaiming-uniform, as in the paper's reference code) and B at zero, so a freshly
wrapped model computes exactly what it did before. `merge_lora` folds B A into W and puts plain
nn.Linear layers back, so a trained model saves as an ordinary checkpoint that any loader reads.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.cli import UserError

DEFAULT_TARGETS = ("blocks.*",)   # every Linear inside the transformer blocks


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise UserError(f"LoRA rank must be positive, not {rank}")
        self.base, self.rank, self.alpha = base, int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(self.rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function (W + scale * B A)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            out.weight.copy_((b.weight.float() + delta).to(b.weight.dtype))
            if b.bias is not None:
                out.bias.copy_(b.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
               dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose dotted name matches a pattern of `targets` (fnmatch, e.g.
    "blocks.*", "blocks.2[0-9].attn.*", "*.qkv"); their weights are frozen. Returns the wrapped names.
    Other parameters keep their requires_grad: freezing the rest is the caller's choice."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        raise UserError(f"no nn.Linear layer matches the LoRA targets {list(targets)}")
    for n in names:
        _set_child(model, n, LoRALinear(model.get_submodule(n), rank, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns the model."""
    for n in [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]:
        _set_child(model, n, model.get_submodule(n).merged())
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]
