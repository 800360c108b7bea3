"""From scoring requests to forward passes, shared by every torch backend (models/lm.py, models/hf.py).

Pure Python, no torch: which token sequences to run and which positions of each to score. A
backend only supplies the forward pass. Keeping this in one place is what makes the native and the
transformers backends score the same requests the same way (and the same way lm-eval does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from harness.cli import UserError


@dataclass
class Unit:
    """One forward sequence; each target list is scored against the last len(targets) positions."""
    tokens: tuple[int, ...]
    targets: list[tuple[int, list[int]]] = field(default_factory=list)   # (result index, target ids)


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's `_encode_pair` first step: trailing whitespace of the context starts the
    continuation, so " A" is scored as the word-initial token it is in running text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def split_encoding(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for a non-empty context, exactly as lm-eval's causal
    `_encode_pair`: the continuation's ids are those of encode(context + continuation) past
    encode(context), so a token straddling the boundary is scored as the tokenizer makes it."""
    context, continuation = move_trailing_space(context, continuation)
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def encode_pairs(encode_pair: Callable[[str, str], tuple[list[int], list[int]]],
                 requests: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Each (context, continuation) request through a backend's `_encode_pair`; a continuation
    with no tokens of its own has nothing to score, a UserError naming it."""
    pairs = [encode_pair(c, x) for c, x in requests]
    for (_, cont), (_, continuation) in zip(pairs, requests):
        if not cont:
            raise UserError(f"continuation {continuation!r} is empty after tokenization")
    return pairs


def loglikelihood_units(pairs: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[Unit]:
    """One unit per distinct input: requests that share context + continuation[:-1] (MMLU's " A"..
    " D" after one question) share one forward pass, as lm-eval's logits cache does. The input is
    lm-eval's (context + continuation)[-(max_length + 1):][:-1]."""
    units: dict[tuple[int, ...], Unit] = {}
    for i, (ctx, cont) in enumerate(pairs):
        inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
        units.setdefault(inp, Unit(inp)).targets.append((i, cont))
    return list(units.values())


def rolling_units(token_lists: Sequence[list[int]], prefix_token: int, max_length: int,
                  stride: int | None = None) -> list[Unit]:
    """lm-eval's `get_rolling_token_windows` + `make_disjoint_window` (context_len=1) when stride ==
    max_length: the first window predicts its tokens from `prefix_token`, each later one predicts
    the next `stride` tokens with max_length tokens of left context. Empty texts get no unit (0)."""
    stride = min(stride or max_length, max_length)
    units = []
    for i, toks in enumerate(token_lists):
        if not toks:
            continue
        first = min(max_length, len(toks))
        units.append(Unit(tuple([prefix_token] + toks[: first - 1]), [(i, toks[:first])]))
        done = first
        while done < len(toks):
            end = min(done + stride, len(toks))
            units.append(Unit(tuple(toks[max(0, end - max_length - 1): end - 1]), [(i, toks[done:end])]))
            done = end
    return units


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_groups(units: list[Unit], min_shared: int) -> Iterator[tuple[int, list[Unit]]]:
    """Sort units lexicographically and split them into runs that share a token prefix of at least
    `min_shared` tokens (a few-shot block: its KV cache is computed once per run), then one group of
    all the rest (shared prefix 0). The prefix stops before every unit's first scored position:
    choices that begin alike (ARC's " the sun" / " the moon") put their common first tokens in
    every unit, and the hidden state that predicts them must come from the unit's own pass."""
    units = sorted(units, key=lambda u: u.tokens)
    unshared, i = [], 0
    while i < len(units):
        first, j = units[i].tokens, i + 1
        head = first[:min_shared]   # tuple slices compare in C: fast on 14k questions
        while len(head) == min_shared and j < len(units) and units[j].tokens[: len(head)] == head:
            j += 1
        group = units[i:j]
        shared = common_prefix(first, group[-1].tokens) if len(group) > 1 else 0
        shared = min(shared, min(first_scored(u) for u in group))
        if min_shared and shared >= min_shared:
            yield shared, group
        else:
            unshared += group
        i = j
    if unshared:
        yield 0, unshared


def first_scored(unit: Unit) -> int:
    """The first position whose hidden state some target of `unit` needs (at least one token stays
    the unit's own, even for a unit without targets)."""
    longest = max((len(t) for _, t in unit.targets), default=1)
    return len(unit.tokens) - max(longest, 1)


def length_batches(group: list[Unit], prefix_len: int, max_batch_tokens: int) -> Iterator[list[Unit]]:
    """Longest first (lm-eval's order: padding stays small and an out-of-memory shows at once), as
    many rows as fit `max_batch_tokens` at the batch's padded width."""
    group = sorted(group, key=lambda u: len(u.tokens), reverse=True)
    start = 0
    while start < len(group):
        width = len(group[start].tokens) - prefix_len
        rows = max(1, max_batch_tokens // max(width, 1))
        yield group[start:start + rows]
        start += rows


def scored_positions(batch: list[Unit], prefix_len: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(row, column, result index, target id) of every scored token: positions [end - n, end) of a
    row (after the shared prefix) predict its n target tokens."""
    rows, cols, owners, targets = [], [], [], []
    for r, u in enumerate(batch):
        end = len(u.tokens) - prefix_len
        for idx, tgt in u.targets:
            rows += [r] * len(tgt)
            cols += range(end - len(tgt), end)
            owners += [idx] * len(tgt)
            targets += tgt
    return rows, cols, owners, targets
