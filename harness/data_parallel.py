"""Data-parallel evaluation under torchrun: every rank scores a share of each chunk, rank 0 writes.

    torchrun --nproc_per_node=8 -m harness task=mmlu model=gpt2-124m

Why this shape: the engine's unit of work is a chunk of not-yet-scored samples (harness.evaluate),
so parallelism goes inside the chunk. Each chunk is split across ranks balanced by token count
(`shard`: longest sample to the least-loaded rank), each rank runs `task.score` on its share with
its own model copy on its own device (cuda:<LOCAL_RANK>, or the CPU under gloo), and rank 0 gathers
the records, puts them back in sample order and appends them to records.jsonl. Rank 0 alone owns
the run folder (lock, run.json, records, metrics, leaderboard), so a killed run resumes exactly as a
one-process run does, and the records are those a one-process run writes (each sample is scored
by the same code; only which process runs it changes). A judged task's judge calls are spread over
the ranks with the samples.

A rank whose scoring fails (a judge that is not there, bad data) must not leave the others waiting
in a collective forever: every chunk's gather carries either the records or the error, and every
rank then raises the first error, so the job stops as a one-process run would.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Sequence


def adopt_submitit_tasks() -> None:
    """Inside a SLURM job of several tasks (`hydra.launcher.tasks_per_node=N`, one per GPU, under
    `hydra/launcher=slurm` or `submitit_local`), every task runs the same Hydra job. Exporting
    submitit's view of the job as torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) makes those tasks one data-parallel job, exactly as under torchrun, instead of N
    copies that would each write the same rows. Nothing happens outside such a job or under torchrun."""
    if "RANK" in os.environ:
        return
    try:
        import submitit
        env = submitit.JobEnvironment()
        if env.num_tasks <= 1:
            return
    except (ImportError, RuntimeError):   # no submitit, or not inside a submitit job
        return
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> str:
    """A CUDA device becomes this process's own GPU (cuda:<LOCAL_RANK>) under torchrun."""
    if str(device) == "cuda" and rank_world()[1] > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return str(device)


def init(device: str) -> None:
    """One process group for the job: nccl between GPUs, gloo on the CPU. Outside torchrun: nothing."""
    if rank_world()[1] <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (the run folder, the samples left to score)."""
    if rank_world()[1] <= 1:
        return value                   # one process: no torch needed (the engine runs without it)
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list | None:
    """Every rank's `value`, in rank order, on rank 0; None on the others."""
    rank, world = rank_world()
    if world <= 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world if rank == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def shard(costs: Sequence[int], world: int) -> list[list[int]]:
    """Indices of `costs` per rank, each rank's total cost as even as greedy gets it: the costliest
    item goes to the least-loaded rank (ties: the lower rank). Deterministic, so every rank computes
    the same split without talking; each rank's indices come back in ascending order."""
    load, parts = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += max(1, costs[i])
    return [sorted(p) for p in parts]


def sample_cost(lm, sample) -> int:
    """A sample's size in tokens (its text fields through the model's tokenizer); characters when
    the scorer has no tokenizer (task=judge_probes scores the judge)."""
    text = "\n".join(str(v) for v in sample.data.values() if isinstance(v, (str, list)))
    count = getattr(lm, "count_tokens", None)
    return count(text) if callable(count) else len(text)


class RankFailed(Exception):
    """Another rank's scoring raised: carried to every rank so all stop together."""


def score_chunk(score: Callable[[list], list], chunk: list, costs: Sequence[int]) -> list | None:
    """This rank scores its share of `chunk`; rank 0 gets all records in chunk order, others None.
    An exception on any rank is raised on every rank (the original on the rank where it happened)."""
    rank, world = rank_world()
    if world <= 1:
        return score(chunk)
    mine = [chunk[i] for i in shard(costs, world)[rank]]
    error: BaseException | None = None
    try:
        result: Any = ("ok", score(mine) if mine else [])
    except Exception as e:            # carried to the others, then raised here too
        error, result = e, ("error", _portable(e))
    results = gather(result)
    failure = broadcast(next((r[1] for r in results if r[0] == "error"), None) if results else None)
    if error is not None:
        raise error
    if failure is not None:
        raise failure if isinstance(failure, BaseException) else RankFailed(str(failure))
    if rank != 0:
        return None
    order = {s.id: i for i, s in enumerate(chunk)}
    return sorted((r for _, part in results for r in part), key=lambda r: order.get(r.sample_id, len(order)))


def _portable(error: BaseException) -> BaseException | str:
    """The exception itself when it pickles (a UserError keeps its one-line message), else its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return f"{type(error).__name__}: {error}"
