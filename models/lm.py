"""`TorchLM`: the `LM` protocol (models/protocol.py) for every architecture in `models/`.

GPT-2 and Llama-style models, whatever file the weights came from (native checkpoint, GGUF, Hugging
Face safetensors). Which sequences to run and which positions to score is `models/requests.py`,
shared with the transformers backend (models/hf.py); this file is the forward pass and generation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from harness.cli import UserError
from models.decoder import Model
from models.generate import generate_tokens
from models.protocol import LM, cut_at_stop  # noqa: F401  (re-exported: older imports name models.lm)
from models.requests import (Unit, common_prefix, encode_pairs, length_batches, loglikelihood_units, prefix_groups,
                             rolling_units, scored_positions, split_encoding)


class TorchLM:
    """The LM protocol (models/protocol.py) over any `Model` (models/decoder.py) and its tokenizer.

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
        # EOS, and the vocabulary's end-of-turn token where that is another one (`end_of_turn_ids`)
        self._stop_ids = [tokenizer.eos_id] + [i for i in end_of_turn_ids(tokenizer) if i != tokenizer.eos_id]

    # -- tokenization -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of `text` as the model reads a prompt: BOS first where the model uses one."""
        ids = self.tokenizer.encode(text)
        return [self.tokenizer.bos_id] + ids if self.tokenizer.add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token], self.tokenizer.encode(continuation)
        return split_encoding(self.encode, context, continuation)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    # -- scoring ----------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        self.require_vocabulary_head()
        pairs = encode_pairs(self._encode_pair, requests)
        return self._score(loglikelihood_units(pairs, self.max_length), len(requests))

    def loglikelihood_rolling(self, texts: Sequence[str], *, max_length: int | None = None,
                              stride: int | None = None) -> list[float]:
        self.require_vocabulary_head()
        max_len = min(max_length or self.max_length, self.max_length)
        units = rolling_units([self.encode(t) for t in texts], self.prefix_token, max_len, stride)
        return self._score(units, len(texts))

    def _score(self, units: list[Unit], n_results: int) -> list[float]:
        results = [0.0] * n_results
        bar = tqdm(total=len(units), desc=f"{self.name} loglikelihood", disable=not self.progress,
                   mininterval=2.0, leave=False)
        with torch.inference_mode():
            for prefix_len, group in prefix_groups(units, self.min_shared_prefix):
                self._score_group(group, prefix_len, results, bar)
        bar.close()
        return results

    def _score_group(self, group: list[Unit], prefix_len: int, results: list[float], bar) -> None:
        prefix_cache = None
        if prefix_len:
            prefix_cache = self.model.new_cache(1, prefix_len)
            self.model.hidden_states(torch.tensor([group[0].tokens[:prefix_len]], device=self.device), prefix_cache)
        for batch in length_batches(group, prefix_len, self.max_batch_tokens):
            width = len(batch[0].tokens) - prefix_len
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for r, u in enumerate(batch):  # right padding: causal rows never look at it
                own = u.tokens[prefix_len:]
                tokens[r, : len(own)] = torch.tensor(own, dtype=torch.long)
            cache = prefix_cache.expand(len(batch), width) if prefix_cache is not None else None
            hidden = self.model.hidden_states(tokens.to(self.device), cache)
            self._accumulate(batch, hidden, prefix_len, results)
            bar.update(len(batch))

    def _accumulate(self, batch: list[Unit], hidden: torch.Tensor, prefix_len: int, results: list[float]):
        """Gather the scored positions, run the head there only, add target log-probs to results."""
        rows, cols, owners, targets = scored_positions(batch, prefix_len)
        picked = hidden[torch.tensor(rows), torch.tensor(cols)]                  # [N, D]
        logprobs = torch.empty(len(targets), dtype=torch.float32)
        tgt = torch.tensor(targets, device=hidden.device)
        for s in range(0, len(targets), 1024):  # bounded memory for the [N, vocab] logits
            logits = self.model.logits(picked[s:s + 1024]).float()
            logprobs[s:s + 1024] = (logits.log_softmax(-1).gather(-1, tgt[s:s + 1024, None]).squeeze(-1)).cpu()
        for owner, lp in zip(owners, logprobs.tolist()):
            results[owner] += lp

    def require_vocabulary_head(self) -> None:
        """A UserError for a classifier checkpoint: it cannot score or generate text."""
        if self.labels:
            raise UserError(f"{self.name} is a classifier ({'/'.join(self.labels)}); it has no "
                             "vocabulary head to score or generate text with")

    def classify(self, texts: Sequence[str], batch_size: int = 16) -> list[list[float]]:
        """Log-probabilities over `self.labels` for each text (classifier checkpoints only)."""
        from models.classifier import class_logits, pad_right
        if not self.labels:
            raise UserError(f"{self.name} has no classifier head; score it through loglikelihood")
        encoded = [self.encode(t) for t in texts]
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
    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer.chat_template is not None

    @property
    def chat_template(self) -> str | None:
        """The template's source text (harness.serve shows it in /api/show)."""
        return self.tokenizer.chat_template

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, batch_size: int | None = None) -> list[str]:
        """Batches of similar-length prompts (`batch_size` rows, or as many as `generate_kv_bytes` of
        KV cache holds, at most 64: a decoding step re-reads every weight whatever the batch, so
        more rows per step come nearly free until the cache or the compute is the limit)."""
        self.require_vocabulary_head()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        encoded = [self.encode(p)[-(self.max_length - 1):] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))   # similar lengths batch together
        outputs: list[str] = [""] * len(prompts)
        decode = self.tokenizer.decode
        prefix, P = self._shared_prefix(encoded)
        if batch_size is None:
            width = max(map(len, encoded), default=1) - P
            batch_size = self._rows_that_fit(width + max_new_tokens, P)
        # A stop string of n characters lies within the last 4n tokens (a byte-level token holds at
        # least one UTF-8 byte), so each step decodes only that tail, not the whole generation.
        tail = 4 * max((len(x) for x in stop), default=0) + 4
        stop_check = (lambda _r, toks: any(x in decode(toks[-tail:]) for x in stop)) if stop else None

        for s in tqdm(range(0, len(order), batch_size), desc=f"{self.name} generate",
                      disable=not self.progress or len(order) <= batch_size, leave=False):
            idx = order[s:s + batch_size]
            new = generate_tokens(self.model, [encoded[i][P:] for i in idx], max_new_tokens=max_new_tokens,
                                  eos_ids=self.stop_ids(), temperature=temperature, top_k=top_k,
                                  top_p=top_p, generator=generator, should_stop=stop_check, prefix=prefix)
            for i, toks in zip(idx, new):
                outputs[i] = cut_at_stop(decode(toks), stop)
        return outputs

    generate_kv_bytes = 2 << 30   # KV cache one generation batch may hold (2 GiB)

    def _rows_that_fit(self, own_positions: int, shared: int) -> int:
        probe = self.model.new_cache(1, 1)
        per_position = (probe.k.numel() + probe.v.numel()) * probe.k.element_size()
        return max(1, min(64, self.generate_kv_bytes // (per_position * (own_positions + shared))))

    def _shared_prefix(self, encoded: list[list[int]]):
        """(1-row KV cache, its length) of the tokens every prompt starts with (a `first_n` few-shot
        block: GSM8K's 5 shots are ~700 of a prompt's ~750 tokens), computed once for the whole
        call; (None, 0) when it is shorter than `min_shared_prefix`. Each prompt keeps at least its
        last token of its own, whose hidden state predicts the first new token."""
        if len(encoded) < 2:
            return None, 0
        n = min(common_prefix(min(encoded), max(encoded)), min(map(len, encoded)) - 1)
        if n < max(self.min_shared_prefix, 1):
            return None, 0
        cache = self.model.new_cache(1, n)
        with torch.inference_mode():
            self.model.hidden_states(torch.tensor([encoded[0][:n]], device=self.device), cache)
        return cache, n

    def stop_ids(self) -> list[int]:
        """Token ids that end a generation."""
        return list(self._stop_ids)


# Chat templates' end-of-turn markers. llama.cpp (so Ollama) ends a generation at these as at EOS
# (its "end of generation" tokens, recognised by their text), which matters where a GGUF names
# another token EOS: Gemma's <eos> (1) vs <end_of_turn> (106), a Qwen base model's <|endoftext|>
# vs <|im_end|>. Without them a turn would run on into the next one.
END_OF_TURN = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids of the END_OF_TURN markers that `tokenizer` has as one whole token (a special token)."""
    ids = []
    for marker in END_OF_TURN:
        encoded = tokenizer.encode(marker)
        if len(encoded) == 1 and tokenizer.decode(encoded) == marker:
            ids.append(encoded[0])
    return ids


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
