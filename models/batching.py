"""Continuous batching: rows (requests) decode together, one token each per model call, and join or
leave between calls. The torch half of harness/serve/engine.py, usable without it:

    batch = BatchDecoder(model, eos_ids=[...], max_batch=8)
    batch.add(Row(prompt_ids, max_new=64))        # prefilled now; its first token is sampled
    while batch.rows:
        finished = batch.step()                   # one token more for every active row

Each row gets exactly the tokens `generate_tokens(model, [prompt], ...)` gives it alone (same
sampler, same per-row generator, grammar and stop hooks), whatever else runs beside it.

Layout. One KV cache [layers, max_batch, H, capacity, D] with one shared column index `length`
(models/cache.py writes every row's new keys at the same column). A row's tokens occupy contiguous
columns ending at `length`; the columns before them are padding, masked out by `valid`
[max_batch, capacity]. So column distance is position distance, which keeps Gemma 3's sliding
window (models/gemma3.py window_keys slices by column) right, and positions are passed per row
[B, 1], as generate_tokens does for left padding. Why these choices:
  - a new row is prefilled alone (a B=1 cache sized to its prompt: no padded prefill work, and the
    same numbers as a lone generation) and then copied into the next free slot, right-aligned at
    `length`; a prompt longer than `length` first shifts the filled columns right.
  - active rows stay packed in slots 0..n-1 (a leaving row's slot gets the last row), so a step runs
    on a view of the first n rows and costs what n rows cost, not max_batch.
  - when the columns run out, the padding every row shares on the left is cut off (compaction)
    before the cache grows; a lone row is compacted to column 0 at once, so it decodes with
    attn_mask=None and positions=None: exactly generate_tokens' single-prompt fast path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from models.cache import KVCache
from models.generate import RowConstraint, sample_next



@dataclass(eq=False)
class Row:
    """One generation. `should_stop(tokens)` runs after each appended token (stop strings, a client
    that left); `on_logits(logits [1, V], next_id [1])` sees each step's fp32 logits after the
    grammar mask, as in generate_tokens. After `done`, `tokens` are the new tokens (EOS excluded)."""
    prompt: Sequence[int]
    max_new: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    constraint: RowConstraint | None = None
    should_stop: Callable[[list[int]], bool] | None = None
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False
    pending: int = 0       # the last sampled token, fed to the model at the next step
    fed: int = 0           # tokens of this row in the cache = the next token's position


class BatchDecoder:
    def __init__(self, model, eos_ids: Sequence[int], max_batch: int = 8, spare: int = 64):
        # spare: columns allocated beyond the first row's need (its first 256 tokens); the cache
        # doubles when full, compacting first
        self.model, self.max_batch, self.spare = model, max_batch, spare
        self.device = model.tok_emb.weight.device
        self.eos = frozenset(int(t) for t in eos_ids)
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.valid: torch.Tensor | None = None
        self.length = 0

    @property
    def free(self) -> int:
        return self.max_batch - len(self.rows)

    def reset(self) -> None:
        """Drop every row and the cache's memory (the server is idle, or a step failed)."""
        self.rows, self.cache, self.valid, self.length = [], None, None, 0

    @torch.inference_mode()
    def add(self, row: Row) -> Row:
        """Prefill `row` alone and sample its first token; it joins the batch unless already done."""
        assert self.free > 0, "the batch is full"
        T = len(row.prompt)
        row.max_new = min(row.max_new, self.model.config.context_length - T)
        if row.max_new <= 0 or T == 0:
            row.done = True
            return row
        alone = self.model.new_cache(1, T)
        hidden = self.model.hidden_states(torch.tensor([list(row.prompt)], device=self.device), alone)
        row.fed = T
        self._pick([row], self.model.logits(hidden[:, -1]).float())
        if not row.done:
            self._place(row, alone)
        return row

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Feed every active row its pending token and sample the next; returns the rows that
        finished (they have left the batch)."""
        rows, n = self.rows, len(self.rows)
        if n == 0:
            return []
        self._room(self.length + 1)
        col = self.length
        tokens = torch.tensor([[r.pending] for r in rows], device=self.device)
        view = self._view(n)
        self.valid[:n, col] = True
        if n == 1 and rows[0].fed == col:     # one row from column 0: no padding, no mask
            hidden = self.model.hidden_states(tokens, view)
        else:
            positions = torch.tensor([[r.fed] for r in rows], device=self.device)
            hidden = self.model.hidden_states(tokens, view, positions=positions,
                                              attn_mask=self.valid[:n, None, None, :col + 1])
        self.length = view.length
        for r in rows:
            r.fed += 1
        self._pick(list(rows), self.model.logits(hidden[:, -1]).float())
        finished = [r for r in rows if r.done]
        for r in finished:
            self.remove(r)
        return finished

    def remove(self, row: Row) -> None:
        """Take `row` out (finished or abandoned): the last row moves into its slot."""
        i, last = self.rows.index(row), len(self.rows) - 1
        if i != last:
            self.cache.k[:, i, :, :self.length] = self.cache.k[:, last, :, :self.length]
            self.cache.v[:, i, :, :self.length] = self.cache.v[:, last, :, :self.length]
            self.valid[i] = self.valid[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.length = 0
        elif len(self.rows) == 1:
            self._compact()     # a lone row decodes from column 0, without a mask

    # ------------------------------------------------------------------ sampling

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Sample each row's next token from logits [n, V] and apply generate_tokens' rules."""
        for i, r in enumerate(rows):
            if r.constraint is not None:
                r.constraint.mask_(logits[i])
        greedy = logits.argmax(dim=-1).tolist() if any(r.temperature <= 0 for r in rows) else None
        for i, r in enumerate(rows):
            if r.temperature <= 0:
                nxt = torch.tensor([greedy[i]], device=logits.device)
            else:
                nxt = sample_next(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)
            if r.on_logits is not None:
                r.on_logits(logits[i:i + 1], nxt)
            t = int(nxt[0])
            if t in self.eos:
                r.done = True
                continue
            r.tokens.append(t)
            r.pending = t
            if r.constraint is not None and r.constraint.accept(t):
                r.done = True
            if r.should_stop is not None and r.should_stop(r.tokens):
                r.done = True
            if len(r.tokens) >= r.max_new:
                r.done = True

    # ------------------------------------------------------------------ the cache's columns

    def _view(self, n: int) -> KVCache:
        """The first n rows of the batch cache, filled up to `length`; the model writes in place."""
        return self.cache.first_rows(n, self.length)

    def _place(self, row: Row, alone: KVCache) -> None:
        """Copy a prefilled row into the next free slot, its last prompt column at `length` - 1."""
        T, n = alone.length, len(self.rows)
        if self.cache is None:
            cap = min(self.model.config.context_length + 1, T + min(row.max_new, 256) + 1 + self.spare)
            self.cache = self.model.new_cache(self.max_batch, cap)   # torch.empty: pages touched when written
            self.valid = torch.zeros(self.max_batch, cap, dtype=torch.bool, device=self.device)
        self._room(max(self.length, T) + 1)
        if T > self.length:             # shift the filled columns right to make room on the left
            d, L = T - self.length, self.length
            for t in (self.cache.k, self.cache.v):
                t[:, :n, :, d:d + L] = t[:, :n, :, :L].clone()
                t[:, :n, :, :d] = 0             # may never have been written (see below)
            self.valid[:n, d:d + L] = self.valid[:n, :L].clone()
            self.valid[:n, :d] = False
            self.length = T
        lo = self.length - T
        self.cache.k[:, n, :, lo:self.length] = alone.k[:, 0, :, :T]
        self.cache.v[:, n, :, lo:self.length] = alone.v[:, 0, :, :T]
        # the padding is masked, but uninitialised memory may hold NaN, which survives a -inf mask
        self.cache.k[:, n, :, :lo] = 0
        self.cache.v[:, n, :, :lo] = 0
        self.valid[n] = False
        self.valid[n, lo:self.length] = True
        self.rows.append(row)

    def _compact(self) -> None:
        """Cut off the padding columns every row has on the left."""
        lo = self.length - max((r.fed for r in self.rows), default=0)
        if lo <= 0:
            return
        n, L = len(self.rows), self.length - lo
        for t in (self.cache.k, self.cache.v):
            t[:, :n, :, :L] = t[:, :n, :, lo:self.length].clone()
        self.valid[:n, :L] = self.valid[:n, lo:self.length].clone()
        self.valid[:n, L:] = False
        self.length = L

    def _room(self, need: int) -> None:
        """At least `need` columns: compact first, then grow (copying) if that is not enough."""
        if need <= self.cache.capacity:
            return
        before = self.length
        self._compact()
        need -= before - self.length
        if need <= self.cache.capacity:
            return
        cap = max(need, min(2 * self.cache.capacity, self.model.config.context_length + 1))
        bigger = self.model.new_cache(self.max_batch, cap)
        bigger.k[:, :, :, :self.length] = self.cache.k[:, :, :, :self.length]
        bigger.v[:, :, :, :self.length] = self.cache.v[:, :, :, :self.length]
        valid = torch.zeros(self.max_batch, cap, dtype=torch.bool, device=self.device)
        valid[:, :self.length] = self.valid[:, :self.length]
        self.cache, self.valid = bigger, valid
