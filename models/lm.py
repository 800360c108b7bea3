"""The LM adapter: everything a task may ask of a model (lm-evaluation-harness's three methods).

Tasks only see the `LM` protocol. `TorchLM` implements it for every architecture in `models/`
(GPT-2 and Llama-style), whatever file the weights came from.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class LM(Protocol):
    name: str

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        """Sum of log-probs of each continuation given its context, (context, continuation) pairs.

        Tokenized as lm-eval does: trailing spaces of the context move to the continuation, the
        continuation's tokens are those of tok(context + continuation) past tok(context).
        """
        ...

    def loglikelihood_rolling(
        self, texts: Sequence[str], *, max_length: int | None = None, stride: int | None = None
    ) -> list[float]:
        """Log-prob of each whole text, scored in windows of `max_length` tokens that advance by
        `stride` (stride == max_length: lm-eval's disjoint windows; smaller: every token is still
        scored exactly once, with more left context). The first token is predicted from EOS/BOS."""
        ...

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continuations of each prompt (raw text in, raw text out; greedy when temperature == 0),
        cut before the first stop string."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of tokens the model's tokenizer makes of `text` (for token-level perplexity)."""
        ...


# --- the implementation for our torch models -----------------------------------------------------

from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from harness.cli import UserError
from models.generate import generate_tokens  # noqa: E402
from models.decoder import Model  # noqa: E402


@dataclass
class _Unit:
    """One forward sequence; each target list is scored against the last len(targets) positions."""
    tokens: tuple[int, ...]
    targets: list[tuple[int, list[int]]] = field(default_factory=list)   # (result index, target ids)


class TorchLM:
    """LM protocol over any `Model` (models/decoder.py) and its tokenizer.

    Speed comes from doing less work, never from approximations:
    - requests sharing a context with one-token continuations (MMLU's " A".." D") share one forward;
    - sequences sharing a long token prefix (a few-shot block) compute its KV cache once;
    - the vocabulary head runs only at the positions scored;
    - batches are length-sorted, so padding is small.
    """

    def __init__(self, model: Model, tokenizer, *, name: str, info: dict | None = None,
                 max_batch_tokens: int = 4096, min_shared_prefix: int = 64, progress: bool = True):
        self.model = _inference_layout(model.eval())
        self.tokenizer = tokenizer
        self.name = name
        self.info = info or {}
        self.max_length = model.config.context_length
        self.max_batch_tokens = max_batch_tokens
        self.min_shared_prefix = min_shared_prefix
        self.progress = progress
        self.device = model.tok_emb.weight.device
        # The token that predicts a text's first token: BOS where the model uses one, else EOS (lm-eval).
        self.prefix_token = tokenizer.bos_id if tokenizer.add_bos and tokenizer.bos_id is not None else tokenizer.eos_id
        # A classifier checkpoint (num_classes > 0) answers classify(); its labels come from config.json.
        self.labels: list[str] | None = list(self.info.get("labels") or []) or None

    # -- tokenization -----------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        return [self.tokenizer.bos_id] + ids if self.tokenizer.add_bos else ids

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token], self.tokenizer.encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # lm-eval moves trailing spaces into the continuation
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    # -- scoring ----------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        self._require_vocabulary_head()
        units: dict[tuple[int, ...], _Unit] = {}
        for i, (context, continuation) in enumerate(requests):
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise UserError(f"continuation {continuation!r} is empty after tokenization")
            seq = (ctx + cont)[-(self.max_length + 1):]
            inp = tuple(seq[:-1])
            units.setdefault(inp, _Unit(inp)).targets.append((i, cont))
        return self._score(list(units.values()), len(requests))

    def loglikelihood_rolling(self, texts: Sequence[str], *, max_length: int | None = None,
                              stride: int | None = None) -> list[float]:
        self._require_vocabulary_head()
        max_len = min(max_length or self.max_length, self.max_length)
        stride = min(stride or max_len, max_len)
        units = []
        for i, text in enumerate(texts):
            toks = self._encode(text)
            if not toks:   # the empty text: log-probability 0, nothing to score
                continue
            first = min(max_len, len(toks))
            units.append(_Unit(tuple([self.prefix_token] + toks[: first - 1]), [(i, toks[:first])]))
            done = first
            while done < len(toks):  # each later window predicts `stride` new tokens with max_len context
                end = min(done + stride, len(toks))
                units.append(_Unit(tuple(toks[end - max_len - 1: end - 1]), [(i, toks[done:end])]))
                done = end
        return self._score(units, len(texts))

    def _score(self, units: list[_Unit], n_results: int) -> list[float]:
        results = [0.0] * n_results
        units.sort(key=lambda u: u.tokens)
        bar = tqdm(total=len(units), desc=f"{self.name} loglikelihood", disable=not self.progress,
                   mininterval=2.0, leave=False)
        with torch.inference_mode():
            for prefix_len, group in self._prefix_groups(units):
                self._score_group(group, prefix_len, results, bar)
        bar.close()
        return results

    def _prefix_groups(self, units: list[_Unit]):
        """Split lexicographically sorted units into runs that share a long token prefix (scored
        with that prefix's KV cache computed once) and one group of all the rest (prefix 0)."""
        unshared, i = [], 0
        while i < len(units):
            first, j = units[i].tokens, i + 1
            head = first[: self.min_shared_prefix]   # tuple slices compare in C: fast on 14k questions
            while len(head) == self.min_shared_prefix and j < len(units) and units[j].tokens[: len(head)] == head:
                j += 1
            group = units[i:j]
            shared = _common_prefix(first, group[-1].tokens) if len(group) > 1 else 0
            shared = min(shared, min(len(u.tokens) for u in group) - 1)  # every row keeps >= 1 own token
            if shared >= self.min_shared_prefix:
                yield shared, group
            else:
                unshared += group
            i = j
        if unshared:
            yield 0, unshared

    def _score_group(self, group: list[_Unit], prefix_len: int, results: list[float], bar) -> None:
        prefix_cache = None
        if prefix_len:
            prefix_cache = self.model.new_cache(1, prefix_len)
            self.model.hidden_states(torch.tensor([group[0].tokens[:prefix_len]], device=self.device), prefix_cache)
        group = sorted(group, key=lambda u: len(u.tokens), reverse=True)
        start = 0
        while start < len(group):
            width = len(group[start].tokens) - prefix_len
            rows = max(1, self.max_batch_tokens // max(width, 1))
            batch = group[start:start + rows]
            start += len(batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for r, u in enumerate(batch):  # right padding: causal rows never look at it
                own = u.tokens[prefix_len:]
                tokens[r, : len(own)] = torch.tensor(own, dtype=torch.long)
            cache = prefix_cache.expand(len(batch), width) if prefix_cache is not None else None
            hidden = self.model.hidden_states(tokens.to(self.device), cache)
            self._accumulate(batch, hidden, prefix_len, results)
            bar.update(len(batch))

    def _accumulate(self, batch: list[_Unit], hidden: torch.Tensor, prefix_len: int, results: list[float]):
        """Gather the scored positions, run the head there only, add target log-probs to results."""
        rows, cols, owners, targets = [], [], [], []
        for r, u in enumerate(batch):
            end = len(u.tokens) - prefix_len   # positions [end - n, end) predict the n target tokens
            for idx, tgt in u.targets:
                rows += [r] * len(tgt)
                cols += range(end - len(tgt), end)
                owners += [idx] * len(tgt)
                targets += tgt
        picked = hidden[torch.tensor(rows), torch.tensor(cols)]                  # [N, D]
        logprobs = torch.empty(len(targets), dtype=torch.float32)
        tgt = torch.tensor(targets, device=hidden.device)
        for s in range(0, len(targets), 1024):  # bounded memory for the [N, vocab] logits
            logits = self.model.logits(picked[s:s + 1024]).float()
            logprobs[s:s + 1024] = (logits.log_softmax(-1).gather(-1, tgt[s:s + 1024, None]).squeeze(-1)).cpu()
        for owner, lp in zip(owners, logprobs.tolist()):
            results[owner] += lp

    def _require_vocabulary_head(self) -> None:
        if self.labels:
            raise UserError(f"{self.name} is a classifier ({'/'.join(self.labels)}); it has no "
                             "vocabulary head to score or generate text with")

    def classify(self, texts: Sequence[str], batch_size: int = 16) -> list[list[float]]:
        """Log-probabilities over `self.labels` for each text (classifier checkpoints only)."""
        from models.classifier import class_logits, pad_right
        if not self.labels:
            raise UserError(f"{self.name} has no classifier head; score it through loglikelihood")
        encoded = [self._encode(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out: list[list[float]] = [[] for _ in texts]
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                tokens, lengths = pad_right([encoded[i] for i in idx], self.tokenizer.eos_id, self.max_length)
                logprobs = class_logits(self.model, tokens.to(self.device), lengths).float().log_softmax(-1)
                for i, row in zip(idx, logprobs.tolist()):
                    out[i] = row
        return out

    # -- generation -------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, batch_size: int = 8) -> list[str]:
        self._require_vocabulary_head()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        encoded = [self._encode(p)[-(self.max_length - 1):] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))   # similar lengths batch together
        outputs: list[str] = [""] * len(prompts)
        decode = self.tokenizer.decode

        for s in tqdm(range(0, len(order), batch_size), desc=f"{self.name} generate",
                      disable=not self.progress or len(order) <= batch_size, leave=False):
            idx = order[s:s + batch_size]
            stop_check = (lambda _r, toks: any(x in decode(toks) for x in stop)) if stop else None
            new = generate_tokens(self.model, [encoded[i] for i in idx], max_new_tokens=max_new_tokens,
                                  eos_ids=self._stop_ids(), temperature=temperature, top_k=top_k,
                                  top_p=top_p, generator=generator, should_stop=stop_check)
            for i, toks in zip(idx, new):
                outputs[i] = cut_at_stop(decode(toks), stop)
        return outputs

    def _stop_ids(self) -> list[int]:
        return [self.tokenizer.eos_id]


def _inference_layout(model):
    """Store fp32 Linear weights as [in, out] in memory (same values, transposed strides).

    MKL's fp32 matrix-vector and matrix-matrix products read that layout 25-40% faster on these CPUs
    (bench/generate_speed.py); bf16 kernels prefer the usual [out, in]. A tied head gets its own
    [in, out] copy, since the embedding lookup still wants rows. Only for inference: never saved.
    """
    if model.tok_emb.weight.dtype != torch.float32:
        return model
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.t().contiguous().t()
    if model.head is None:
        head = torch.nn.Linear(model.config.d_model, model.config.vocab_size, bias=False,
                               device=model.tok_emb.weight.device)
        head.weight.data = model.tok_emb.weight.data.t().contiguous().t()
        model.head = head
    return model


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any (non-empty) stop string."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]
