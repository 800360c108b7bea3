"""`model=hf:<folder or hub id>`: any transformers `AutoModelForCausalLM` behind the `LM` protocol.

It scores exactly what lm-eval's `hf` backend (HFLM) scores, so its numbers are comparable with
lm-eval's and with the native backend's on the same weights: the same tokenization (`_encode_pair`:
the context's trailing whitespace moves to the continuation; the tokenizer's own special tokens,
but no second BOS when the text already starts with it), the same truncation and the same rolling
windows. It is faster by doing less work, never by approximating (models/requests.py): one forward
per distinct input, the few-shot block's KV cache computed once and expanded over each batch (for
models whose cache can be expanded), the vocabulary head only at scored positions, and batches
filled to a token budget, longest first.

Loading and its errors (a folder that is not a model, a hub id that cannot be downloaded): hf_source.py.
"""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Sequence

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

try:
    import transformers
except ImportError:   # the optional [hf] extra: load_hf_lm says how to install it
    transformers = None

from harness.cli import UserError, int_option
from models.hf_source import DTYPES, HFModelError, check_causal_lm, context_length, resolve_folder, weights_digest
from models.protocol import cut_at_stop
from models.requests import (Unit, encode_pairs, length_batches, loglikelihood_units, prefix_groups,
                             rolling_units, scored_positions, split_encoding)

log = logging.getLogger("harness")


def load_hf_lm(name: str, dtype: str = "auto", device: str = "auto", max_batch_tokens: int = 4096,
               gguf_file: str | None = None, progress: bool = True) -> "TransformersLM":
    """The `conf/model/hf.yaml` target. `name`: a local folder (save_pretrained layout, or one
    holding `gguf_file`) or a hub id, downloaded once into the Hugging Face cache."""
    from models.registry import check_device, resolve_device, resolve_dtype
    if transformers is None:
        raise UserError("model=hf: needs transformers; install it with pip install -e '.[hf]'")
    device = resolve_device(device)
    check_device(device)
    dtype = resolve_dtype(dtype, device)
    if str(dtype) not in DTYPES:
        raise UserError(f"model.dtype={dtype}: use auto or one of {', '.join(DTYPES)}")
    folder, label = resolve_folder(str(name), gguf_file)
    label = f"{label}/{gguf_file}" if gguf_file else label
    check_causal_lm(folder, gguf_file)
    max_batch_tokens = int_option(max_batch_tokens, "model.max_batch_tokens", minimum=1)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[str(dtype)], **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **extra)
    except (OSError, ValueError, SafetensorError) as e:   # truncated or mismatched files, no tokenizer files
        raise HFModelError(f"{folder}: transformers cannot load it ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}); restore the folder or save it again "
                           "with save_pretrained") from None
    sha, per_file = weights_digest(folder, gguf_file)
    info = {"model": f"hf:{label}", "checkpoint_sha": sha[:12], "weights_sha256": per_file, "dtype": str(dtype),
            "device": str(device), "batch_size": f"{max_batch_tokens}tok", "provenance": ""}
    return TransformersLM(model.to(device).eval(), tokenizer, name=f"hf:{label}", info=info,
                          max_batch_tokens=max_batch_tokens, progress=progress)


class TransformersLM:
    """The LM protocol over a transformers causal LM and its tokenizer (lm-eval HFLM semantics)."""

    labels = None   # a causal LM: no class head (models/protocol.py Classifier)

    def __init__(self, model, tokenizer, *, name: str, info: dict | None = None, max_batch_tokens: int = 4096,
                 min_shared_prefix: int = 64, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.name, self.info = name, info or {}
        self.max_batch_tokens, self.min_shared_prefix, self.progress = max_batch_tokens, min_shared_prefix, progress
        self.device = next(model.parameters()).device
        self.max_length = context_length(model.config, tokenizer)
        # lm-eval's prefix_token_id: what predicts a text's first token; its text marks "BOS already there"
        self.prefix_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self._prefix_text = tokenizer.decode([self.prefix_token])
        params = inspect.signature(model.forward).parameters
        self._keep_logits = "logits_to_keep" in params      # the head at scored positions only
        # the KV cache argument: `cache` since transformers 5.x, `past_key_values` before
        self._cache_arg = next((a for a in ("cache", "past_key_values") if a in params), None)
        self.prefix_reuse = self._cache_arg is not None   # turned off when the cache cannot be expanded

    # -- tokenization -----------------------------------------------------------------------------
    def _tok_encode(self, text: str) -> list[int]:
        """lm-eval's HFLM.tok_encode: the tokenizer's special tokens, unless the text starts with BOS."""
        return self.tokenizer.encode(text, add_special_tokens=not text.startswith(self._prefix_text))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context:
            return split_encoding(self._tok_encode, context, continuation)
        cont = self.tokenizer.encode(continuation, add_special_tokens=False)
        if cont and cont[0] == self.prefix_token:   # lm-eval: a continuation that starts with BOS keeps it as context
            return cont[:1], cont[1:]
        return [self.prefix_token], cont

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # -- scoring ----------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        pairs = encode_pairs(self._encode_pair, requests)
        return self._score(loglikelihood_units(pairs, self.max_length), len(requests))

    def loglikelihood_rolling(self, texts: Sequence[str], *, max_length: int | None = None,
                              stride: int | None = None) -> list[float]:
        max_len = min(max_length or self.max_length, self.max_length)
        units = rolling_units([self._tok_encode(t) for t in texts], self.prefix_token, max_len, stride)
        return self._score(units, len(texts))

    def _score(self, units: list[Unit], n_results: int) -> list[float]:
        results = [0.0] * n_results
        bar = tqdm(total=len(units), desc=f"{self.name} loglikelihood", disable=not self.progress,
                   mininterval=2.0, leave=False)
        with torch.inference_mode():
            for prefix_len, group in prefix_groups(units, self.min_shared_prefix if self.prefix_reuse else 0):
                cache = self._prefix_cache(group[0].tokens[:prefix_len]) if prefix_len and self.prefix_reuse else None
                prefix_len = prefix_len if cache is not None else 0
                for batch in length_batches(group, prefix_len, self.max_batch_tokens):
                    self._score_batch(batch, prefix_len, cache, results)
                    bar.update(len(batch))
        bar.close()
        return results

    def _prefix_cache(self, tokens: Sequence[int]):
        """The KV cache of a shared prefix, or None when this model's cache cannot be copied and
        expanded over a batch (then prefix reuse stays off and every row runs in full)."""
        out = self.model(input_ids=torch.tensor([tokens], device=self.device), use_cache=True,
                         **({"logits_to_keep": 1} if self._keep_logits else {}))
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        try:
            self._expand(cache, 2)
            return cache
        except (AttributeError, NotImplementedError, TypeError, ValueError, RuntimeError) as e:
            log.info("%s: no few-shot prefix reuse, its %s cannot be expanded (%s)", self.name,
                     type(cache).__name__, e)
            self.prefix_reuse = False
            return None

    @staticmethod
    def _expand(cache, rows: int):
        """A copy of `cache` repeated over `rows` batch rows; the forward pass extends the copy."""
        expanded = copy.deepcopy(cache)
        expanded.batch_repeat_interleave(rows)
        return expanded

    def _score_batch(self, batch: list[Unit], prefix_len: int, cache, results: list[float]) -> None:
        width = len(batch[0].tokens) - prefix_len
        tokens = torch.zeros(len(batch), width, dtype=torch.long)   # right padding (lm-eval): causal rows ignore it
        for r, u in enumerate(batch):
            own = u.tokens[prefix_len:]
            tokens[r, : len(own)] = torch.tensor(own, dtype=torch.long)
        rows, cols, owners, targets = scored_positions(batch, prefix_len)
        kwargs: dict = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_arg] = self._expand(cache, len(batch))
        if self._keep_logits:
            keep = sorted(set(cols))
            kwargs["logits_to_keep"] = torch.tensor(keep, device=self.device)
            at = {c: i for i, c in enumerate(keep)}
            cols = [at[c] for c in cols]
        logits = self.model(input_ids=tokens.to(self.device), **kwargs).logits
        picked = logits[torch.tensor(rows), torch.tensor(cols)].float().log_softmax(-1)   # [N, vocab]
        logprobs = picked.gather(-1, torch.tensor(targets, device=picked.device)[:, None]).squeeze(-1)
        for owner, lp in zip(owners, logprobs.tolist()):
            results[owner] += lp

    # -- generation -------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise UserError(f"{self.name}: the tokenizer has no chat template; use a plain prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, batch_size: int = 8) -> list[str]:
        """model.generate on left-padded batches of similar length (lm-eval's generate_until);
        a row stops at EOS or once its text holds a stop string, and is cut before it."""
        if seed is not None:
            torch.manual_seed(seed)   # transformers samples from torch's global generator
        room = max(1, self.max_length - max_new_tokens)
        encoded = [self._tok_encode(p)[-room:] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [self.tokenizer.eos_token_id])
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0} \
            if temperature > 0 else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        outputs = [""] * len(prompts)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                    mask[r, width - len(encoded[i]):] = 1
                stops = [_StopStrings(self.tokenizer, stop, width)] if stop else []
                criteria = transformers.StoppingCriteriaList(stops)
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=max_new_tokens, pad_token_id=pad,
                                          stopping_criteria=criteria, **sampling)
                for r, i in enumerate(idx):
                    toks = out[r, width:].tolist()
                    end = next((k for k, t in enumerate(toks) if t in eos), len(toks))
                    outputs[i] = cut_at_stop(self.tokenizer.decode(toks[:end], skip_special_tokens=True), stop)
        return outputs


class _StopStrings:
    """A transformers stopping criterion (duck-typed, so this module imports without transformers):
    per row, done once the text generated so far holds a stop string (decoded, so a stop string
    split across tokens is still seen)."""

    def __init__(self, tokenizer, stop: Sequence[str], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, [s for s in stop if s], start

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool, device=input_ids.device)
