"""Checking a config against the tensors a model file holds, before anything real is allocated.

A config that does not belong to its weights (an empty `config: {}` falls back to a 7B default) would
otherwise build a model of the config's size first and fail only when the weights are loaded, after
the allocation has exhausted memory. Here the config's tensors are computed on the `meta` device
(shapes only, no storage) and compared with the shapes in the file's header.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import fields, replace

import torch

from models.architectures import lookup
from models.checkpoint import CheckpointError

# Sizes that must be whole numbers >= 1 (num_classes may be 0: no classifier head).
SIZES = ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")


def make_config(architecture: str, config, source: str, names: dict[str, str] | None = None):
    """The config dataclass, refusing unknown keys and sizes no model can have. `source` names the
    file the config came from; `names` maps our keys to the file's own (HF's n_embd, GGUF's keys)."""
    config_cls = lookup(architecture, source).config
    if isinstance(config, dict):
        known = [f.name for f in fields(config_cls)]
        unknown = sorted(set(config) - set(known), key=str)
        if unknown:
            raise CheckpointError(f"{source}: unknown {architecture} config key {unknown[0]!r}; "
                                  f"known keys: {', '.join(known)}")
        config = config_cls(**config)
    elif not isinstance(config, config_cls):
        raise CheckpointError(f"{source}: a {type(config).__name__} is not a {architecture} config "
                              f"(a mapping of {config_cls.__name__} settings)")
    _check_values(config, source, names or {})
    return config


def _check_values(config, source: str, names: dict[str, str]) -> None:
    """Checks by config field, not by architecture: every architecture with a field shares its meaning."""
    def bad(key: str, want: str):
        value = getattr(config, key)
        raise CheckpointError(f"{source}: {names.get(key, key)}={value!r} is not valid; it must be {want}")

    def whole(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def real(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    for f in fields(config):
        v = getattr(config, f.name)
        if f.name in SIZES and not (whole(v) and v >= 1):
            bad(f.name, "a whole number >= 1")
        if f.name == "num_classes" and not (whole(v) and v >= 0):
            bad(f.name, "a whole number >= 0")
        if f.name in ("rope_base", "norm_eps") and not (real(v) and v > 0):
            bad(f.name, "a number > 0")
        if f.name == "dropout" and not (real(v) and 0 <= v < 1):
            bad(f.name, "a number in [0, 1)")
        if f.type == "bool" and not isinstance(v, bool):
            bad(f.name, "true or false")
    if config.d_model % config.n_heads:
        bad("d_model", f"a multiple of n_heads={config.n_heads}")
    if config.n_heads % config.n_kv_heads:
        bad("n_heads", f"a multiple of n_kv_heads={config.n_kv_heads}")
    if hasattr(config, "rope_base") and config.head_dim % 2:   # a RoPE model
        bad("d_model", f"n_heads={config.n_heads} times an even head size (RoPE rotates pairs)")
    if hasattr(config, "rope_scaling"):
        s, keys = config.rope_scaling, ("factor", "low_freq_factor", "high_freq_factor", "original_context_length")
        if s is not None and not (isinstance(s, dict) and all(real(s.get(k)) and s[k] > 0 for k in keys)):
            bad("rope_scaling", f"null or a mapping of {', '.join(keys)} (numbers > 0)")


def meta_state(architecture: str, config) -> dict[str, torch.Tensor]:
    """The state_dict a model of `config` has, as meta tensors: shapes without storage."""
    with torch.device("meta"):
        return lookup(architecture).build(config).state_dict()


def count(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in state.values())


def parameter_count(architecture: str, config) -> int:
    """Values in the state_dict of a model of `config`, from 1- and 2-layer meta models: a config
    claiming a million layers costs no more to check than one claiming two."""
    one, two = (count(meta_state(architecture, replace(config, n_layers=n))) for n in (1, 2))
    return one + (config.n_layers - 1) * (two - one)


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def mismatch(expected: dict, found: dict) -> str:
    """'missing: …; unexpected: …; wrong shape: …' between two {name: tensor}; '' when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in expected.keys() & found.keys() if tuple(expected[k].shape) != tuple(found[k].shape))
    return "; ".join(
        f"{label}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names)


def check_fits(architecture: str, config, found: dict[str, torch.Tensor], config_src: str, weights_src: str,
               fix: str, names: dict[str, str] | None = None):
    """The config dataclass when the file's tensors (`found`, meta or real, in our names) are exactly
    the ones a model of `config` has; otherwise one CheckpointError naming both and `fix`."""
    config = make_config(architecture, config, config_src, names)
    want, held = parameter_count(architecture, config), count(found)
    if want != held:
        a, b = human(want), human(held)
        a, b = (f"{want:,}", f"{held:,}") if a == b else (a, b)
        raise CheckpointError(f"{config_src} describes a {architecture} model of {a} parameters but {weights_src} "
                              f"holds {b}, so it does not fit a {architecture} model of this config; {fix}")
    detail = mismatch(meta_state(architecture, config), found)
    if detail:
        raise CheckpointError(f"{weights_src} does not fit a {architecture} model of the config in {config_src} "
                              f"({detail}); {fix}")
    if hasattr(config, "rope_base") and 2 * config.context_length * config.head_dim > held:
        # The RoPE cos/sin tables are built for every position: an absurd context allocates them.
        raise CheckpointError(f"{config_src}: {(names or {}).get('context_length', 'context_length')}="
                              f"{config.context_length} needs RoPE tables larger than the model's {human(held)} "
                              f"weights; {fix}")
    return config
