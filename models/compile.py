"""`compile=true`: torch.compile on the three hot paths, chosen so that nothing else changes.

- Scoring and decoding (`model.compile=true` for eval and serve): the model's `hidden_states` is
  compiled on the instance, once for the whole stack of blocks. One graph spans every layer, so a
  layer's index is a constant inside it, not a value to guard on (compiling each block instead
  recompiles once per layer, since each indexes its own slice of the KV cache). `dynamic=True`:
  batch size, sequence length and the cache's filled length vary call to call and must not
  recompile each time; in practice there are two graphs, the prefill and the one-token decode step.
  The vocabulary head stays eager: it is one matrix product on the positions a caller picks.
- Training (`compile=true` in conf/train.yaml): each block is compiled in place
  (`nn.Module.compile`), as torchtitan does. Identical blocks share one graph (their parameters are
  graph inputs), so compile time is one block's; module names and state-dict keys are untouched
  (checkpoints, LoRA and FSDP's per-block units see the same tree); and FSDP's hooks run around each
  compiled block, not inside a graph.

Compiled and eager results agree to rounding, not bit for bit (fused kernels sum in another order),
so the model's info records `compile` and a training run's config does (resuming with another value
is refused). It is off by default: on the 2-core CPU this project is measured on it gains 0-12% after
a 30-100 s compile, and loses 8% on bf16 training (bench/compile_speed.py, README).
"""
from __future__ import annotations

import torch

from harness.cli import UserError


def check_available(model) -> None:
    """torch.compile's CPU backend writes and builds C++; without a compiler it fails deep inside
    the first call, so say it up front. Asked of the model's device, not of the machine: a model
    kept on the CPU of a CUDA machine still needs the C++ compiler."""
    import shutil

    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise UserError("compile=true needs a C++ compiler on a CPU machine (torch.compile builds its "
                        "kernels); install g++ or leave compile=false")


def compile_for_inference(model):
    """Compile `model.hidden_states` in place (scoring and decoding); returns the model."""
    check_available(model)
    model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    return model


def compile_for_training(model, announce=None) -> None:
    """Compile each block of `model` in place, before DDP/FSDP wrap it and before the optimizer.
    `announce(message)`, if given, tells the user why the first step is slow."""
    check_available(model)
    if announce is not None:
        announce("compile=true: each block is compiled on its first step (slow), then reused")
    for block in model.blocks:
        block.compile()
