"""Continuous batching (models/batching.py, harness/serve/engine.py): every row of a batch gets the
tokens it gets alone (generate_tokens), whatever joins or leaves beside it and whenever; seeded
sampling, grammar-constrained and log-prob rows keep their own state; over real HTTP, concurrent
clients get the texts sequential calls get, an abandoned request leaves the batch within a step, and
an error inside the model answers every waiting request."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from models.architectures import lookup
from models.batching import BatchDecoder, Row
from models.checkpoint import build_model
from models.generate import generate_tokens

TINY = [("gpt", "gpt-tiny"), ("llama", "llama-tiny"), ("qwen3", "qwen3-tiny"), ("gemma3", "gemma3-tiny")]


def tiny(arch: str, config: str):
    torch.manual_seed(0)
    return build_model(arch, lookup(arch).configs[config]).eval()


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    """Prompts of different lengths, one longer than gemma3-tiny's 16-token window and than what
    the cache holds when it joins."""
    rng = random.Random(seed)
    lengths = [7, 3, 40, 12, 25, 5][:n]
    return [[rng.randrange(1000) for _ in range(k)] for k in lengths]


def run_schedule(batch: BatchDecoder, rows: list[Row], join_at: list[int]) -> None:
    """Row i joins before decode step join_at[i]; steps run until every row is done."""
    step, pending = 0, list(zip(join_at, rows))
    while pending or batch.rows:
        while pending and pending[0][0] <= step and batch.free:
            batch.add(pending.pop(0)[1])
        batch.step()
        step += 1


@pytest.mark.parametrize("arch, config", TINY)
def test_rows_joining_and_leaving_get_their_lone_greedy_tokens(arch, config):
    model = tiny(arch, config)
    ps = prompts(6)
    max_new = [20, 9, 14, 30, 4, 11]          # rows leave at different steps; slots get reused
    rows = [Row(p, max_new=m) for p, m in zip(ps, max_new)]
    batch = BatchDecoder(model, eos_ids=[], max_batch=4)
    run_schedule(batch, rows, join_at=[0, 2, 3, 3, 6, 12])  # the 40-token prompt joins a 3-column cache
    for p, m, r in zip(ps, max_new, rows):
        alone = generate_tokens(model, [p], max_new_tokens=m, eos_ids=[])[0]
        assert r.done and r.tokens == alone, (arch, len(p))
    assert batch.rows == [] and batch.length == 0


def test_cache_compacts_and_grows_when_columns_run_out():
    model = tiny("llama", "llama-tiny")
    ps = prompts(4, seed=2)
    rows = [Row(p, max_new=m) for p, m in zip(ps, [60, 220, 30, 150])]
    batch = BatchDecoder(model, eos_ids=[], max_batch=3, spare=0)
    step, pending, capacities, compacted = 0, list(zip([0, 50, 55, 90], rows)), set(), False
    while pending or batch.rows:
        while pending and pending[0][0] <= step and batch.free:
            batch.add(pending.pop(0)[1])
        before = batch.length
        batch.step()
        compacted |= bool(batch.rows) and batch.length < before
        capacities.add(batch.cache.capacity)
        step += 1
    # the first row's 7 + 60 columns did not hold the rest: the cache grew; and the 3 + 220-token
    # row, joining at column 57, would pass the context without cutting off shared padding
    assert len(capacities) >= 2 and compacted and max(capacities) <= model.config.context_length + 1
    for p, r in zip(ps, rows):
        assert r.tokens == generate_tokens(model, [p], max_new_tokens=r.max_new, eos_ids=[])[0]


def test_seeded_sampling_is_the_same_batched_or_alone():
    model = tiny("qwen3", "qwen3-tiny")
    ps = prompts(3)
    settings = [dict(temperature=0.8, top_k=40, top_p=0.9), dict(temperature=1.2, top_k=None, top_p=None),
                dict(temperature=0.0, top_k=None, top_p=None)]
    rows = [Row(p, max_new=16, generator=torch.Generator().manual_seed(7 + i), **s)
            for i, (p, s) in enumerate(zip(ps, settings))]
    run_schedule(BatchDecoder(model, eos_ids=[], max_batch=4), rows, join_at=[0, 1, 4])
    for i, (p, s, r) in enumerate(zip(ps, settings, rows)):
        alone = generate_tokens(model, [p], max_new_tokens=16, eos_ids=[],
                                generator=torch.Generator().manual_seed(7 + i), **s)[0]
        assert r.tokens == alone


def test_eos_and_should_stop_end_a_row_as_generate_tokens_does():
    model = tiny("gpt", "gpt-tiny")
    ps = prompts(3)
    free = generate_tokens(model, [ps[0]], max_new_tokens=12, eos_ids=[])[0]
    eos = free[5]                                                 # row 0 meets it at its 6th token
    rows = [Row(ps[0], max_new=12), Row(ps[1], max_new=12, should_stop=lambda t: len(t) == 3),
            Row(ps[2], max_new=12)]
    run_schedule(BatchDecoder(model, eos_ids=[eos], max_batch=4), rows, join_at=[0, 0, 2])
    for i, (p, r) in enumerate(zip(ps, rows)):
        stop = (lambda _row, t: len(t) == 3) if i == 1 else None
        assert r.tokens == generate_tokens(model, [p], max_new_tokens=12, eos_ids=[eos], should_stop=stop)[0]
    assert len(rows[0].tokens) == free.index(eos)
