"""strategy=fsdp: the loop's model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), for a
model whose weights, gradients and AdamW state do not fit one device beside each other.

Why these choices:
- The root of the sharding is the loop's LossModule, not the bare model: recipes' loss_fn call
  model.hidden_states / model.logits, which bypass the model's own forward (and so the hooks FSDP
  puts there); LossModule.forward is the one call every step makes, and each block is called as a
  module inside it, so blocks get their own units (one all-gather per block, freed after use).
- Rank 0's weights are broadcast before sharding, as DDP does at wrap time, so every shard starts
  from the same model whatever each rank's constructor drew.
- bf16-mixed: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) halves the all-gather
  bytes and keeps gradient reduction in fp32; the loop keeps its autocast on top, so the ops that
  autocast runs in fp32 (softmax, norms, the cross-entropy) stay fp32 exactly as on the DDP path.
- Evaluation and samples run on the gathered full weights (`full_params`): validation batches are
  shared unevenly over ranks and samples are drawn on rank 0 only, so per-forward collectives
  would deadlock; one all-gather per evaluation costs a full copy of the weights for its length.
- The resumable state is a sharded torch.distributed.checkpoint (each rank writes its own shard,
  nothing is gathered); the final checkpoint is gathered on rank 0 into the usual safetensors
  folder that evaluation loads.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from harness.cli import UserError
from harness.io import write_json

STRATEGIES = ("ddp", "fsdp")
DCP_DIR = "dcp"


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise UserError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return strategy


def checkpoint_blocks(model) -> None:
    """Activation checkpointing: each block keeps only its input and recomputes its activations in
    backward (non-reentrant torch.utils.checkpoint). The block's forward is replaced on the
    instance, so module names and state-dict keys stay as they are, and FSDP's hooks, which run
    around the module call, stay outside the recomputed part."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():   # evaluation and sampling: nothing to save
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def shard(lossmod: torch.nn.Module, model, precision: str) -> None:
    """Shard `lossmod` (LossModule(model, loss_fn)) in place: one FSDP unit per block, the rest
    (embeddings, final norm, head) in the root unit. Call before building the optimizer: it must
    hold the sharded parameters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():
        for t in lossmod.state_dict().values():
            dist.broadcast(t, 0)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16-mixed" else MixedPrecisionPolicy())
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(lossmod, mp_policy=mp)


def set_sync(lossmod, sync: bool) -> None:
    """Gradient accumulation: reduce-scatter only on the last micro-batch (DDP's no_sync)."""
    lossmod.set_requires_gradient_sync(sync)


@contextmanager
def full_params(lossmod):
    """Every rank gathers the full weights into the modules (plain tensors, not shards) and keeps
    them for the duration: with reshard-after-forward off, FSDP's hooks find them gathered and
    issue no collective, so any rank may run any number of forwards (rank 0 alone samples). A
    collective on entry: every rank must enter. Restores FSDP's default after: blocks reshard after
    forward, the root (used again at once by backward) does not."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in lossmod.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(m is not lossmod, recurse=False)
            m.reshard()


def full_state(lossmod) -> dict[str, torch.Tensor]:
    """The model's full state dict on rank 0 (CPU tensors, the bare model's keys), {} elsewhere; a
    collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(lossmod, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in state.items()}


def save_state(out_dir: Path, lossmod, opt, trainer_state: dict, provenance: dict, main: bool) -> None:
    """`last/` as each rank's shard of model and optimizer (dcp/) + trainer_state.pt (rank 0),
    staged and swapped in like the one-process checkpoint (state.swap_in)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from harness.train import state as st

    staging = out_dir / f"{st.TMP}last-sharded"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": get_model_state_dict(lossmod), "optim": get_optimizer_state_dict(lossmod, opt)},
             checkpoint_id=str(staging / DCP_DIR))
    dist.barrier()   # every shard is on disk before rank 0 publishes the folder
    if main:
        torch.save(trainer_state, staging / st.STATE_FILE)
        write_json(staging / "provenance.json", provenance)
        st.swap_in(out_dir, staging)
    dist.barrier()


def load_state(folder: Path, lossmod, opt) -> dict:
    """Each rank reads its shard of model and optimizer from `folder`/dcp; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    from harness.train import state as st

    if not (folder / DCP_DIR).is_dir():
        raise st.RunError(f"{folder} holds no sharded state ({DCP_DIR}/): it was not written with strategy=fsdp")
    sd = {"model": get_model_state_dict(lossmod), "optim": get_optimizer_state_dict(lossmod, opt)}
    dcp.load(sd, checkpoint_id=str(folder / DCP_DIR))
    set_model_state_dict(lossmod, sd["model"])
    set_optimizer_state_dict(lossmod, opt, sd["optim"])
    return torch.load(folder / st.STATE_FILE, map_location="cpu", weights_only=True)
