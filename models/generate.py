"""Token generation with the KV cache: greedy or temperature / top-k / top-p sampling, batched with
left padding, stopping at EOS or stop strings."""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from models.cache import KVCache
from models.decoder import Model


class RowConstraint(Protocol):
    """One row's grammar state (models/constrained.Matcher)."""

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of the tokens it forbids next to -inf, in place."""

    def accept(self, token: int) -> bool:
        """Take the sampled token; True when the row must end (the grammar is complete)."""


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (fp32) -> next token ids [B]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p          # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    constraints: Sequence[RowConstraint | None] | None = None,
    on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    prefix: KVCache | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (EOS excluded). `should_stop(row, tokens)` lets the caller end a
    row early, e.g. on a stop string. `constraints[row]` (None: free) restricts what the row may
    sample to what a grammar allows (models/constrained.py); the row ends when the grammar is
    complete. `on_logits(logits, next_ids)` sees each step's fp32 logits [B, V] (before
    temperature, after any grammar mask) and the ids picked [B], before should_stop: step k of row
    i made that row's k-th token (harness/serve/scoring.py's log-probs).

    `prefix`: a 1-row cache of tokens that come before every prompt (a few-shot block shared by a
    whole task, computed once by the caller); each row starts from a copy of it, so only the rows'
    own tokens are prefilled. Greedy rows that finish leave the batch (their cache rows dropped), so
    one long generation does not keep decoding the others to its length."""
    device = model.tok_emb.weight.device
    P = prefix.length if prefix is not None else 0
    B, lengths = len(prompts), [len(p) for p in prompts]
    width = max(lengths)
    max_new_tokens = min(max_new_tokens, model.config.context_length - P - width)
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    cache = prefix.expand(B, width + max_new_tokens) if prefix is not None else model.new_cache(B, width + max_new_tokens)
    tokens = torch.zeros(B, width, dtype=torch.long)
    valid = torch.zeros(B, P + width + max_new_tokens, dtype=torch.bool)
    valid[:, :P] = True
    for i, p in enumerate(prompts):  # left padding keeps every row's last prompt token in the same column
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, P + width - len(p): P + width] = True
    tokens, valid = tokens.to(device), valid.to(device)
    padded = min(lengths) != width
    if padded:
        positions = (valid[:, :P + width].cumsum(-1) - 1)[:, P:].clamp(min=0)
        causal = torch.ones(width, P + width, dtype=torch.bool, device=device).tril(diagonal=P)
        mask = causal & valid[:, None, :P + width]
        mask[:, :, P:] |= torch.eye(width, dtype=torch.bool, device=device)  # pad rows attend to themselves: no NaN
        hidden = model.hidden_states(tokens, cache, positions=positions, attn_mask=mask[:, None])
    else:
        hidden = model.hidden_states(tokens, cache)
    eos = torch.tensor(list(eos_ids), device=device)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = torch.tensor(lengths, device=device)[:, None] + P
    rows = list(range(B))                  # the original row of each row still in the batch
    shrink = temperature <= 0 and constraints is None and on_logits is None
    for step in range(max_new_tokens):
        logits = model.logits(hidden[:, -1]).float()
        if constraints is not None:
            for i, c in enumerate(constraints):
                if c is not None and not done[i]:
                    c.mask_(logits[i])
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if on_logits is not None:
            on_logits(logits, nxt)
        done |= torch.isin(nxt, eos)
        for r, t in enumerate(nxt.tolist()):
            i = rows[r]
            if not done[r]:
                out[i].append(t)
                if constraints is not None and constraints[i] is not None and constraints[i].accept(t):
                    done[r] = True
                if should_stop is not None and should_stop(i, out[i]):
                    done[r] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if shrink and bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)
            cache.k, cache.v = cache.k[:, keep], cache.v[:, keep]
            valid, next_pos, nxt, done = valid[keep], next_pos[keep], nxt[keep], done[keep]
            rows = [rows[r] for r in keep.tolist()]
        col = P + width + step
        valid[:, col] = True
        if padded:
            hidden = model.hidden_states(nxt[:, None], cache, positions=next_pos + step,
                                         attn_mask=valid[:, None, None, : col + 1])
        else:
            hidden = model.hidden_states(nxt[:, None], cache)
    return out
