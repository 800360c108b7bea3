"""KV cache and attention masks shared by every architecture.

Keys/values are preallocated once ([layers, B, H_kv, capacity, head_dim]) and written in place, so
decoding never concatenates tensors. `expand` turns a cache filled for one shared prefix (a
few-shot block) into a batch cache whose rows all start with that prefix.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0          # positions filled (same for every row)
        self.capacity = capacity

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([B, H_kv, T, Dh]) after the filled positions; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.capacity}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has written its n new positions."""
        self.length += n

    def first_rows(self, n: int, length: int) -> "KVCache":
        """A cache over rows [0, n) of this one's memory (writes land here), `length` positions
        filled: a batch that runs fewer rows than it has slots (models/batching.py)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        view.length, view.capacity = length, self.capacity
        return view

    def expand(self, batch: int, extra: int) -> "KVCache":
        """A new cache of `batch` rows, each starting with this (1-row) cache's positions, with room
        for `extra` more."""
        assert self.batch == 1, "only a single-row prefix cache can be expanded"
        n_layers, _, h, _, d = self.k.shape
        out = KVCache(n_layers, batch, h, d, self.length + extra, self.k.dtype, self.k.device)
        out.k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
        out.v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        out.length = self.length
        return out


def causal_mask(q_len: int, kv_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool [q_len, kv_len] mask for queries at the last q_len of kv_len positions (True = attend)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


def attention_mask(cache: KVCache | None, q_len: int, device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for scaled_dot_product_attention when no explicit mask is given."""
    past = cache.length if cache is not None else 0
    if past == 0:   # plain causal self-attention; a branch, not `q_len > 1`, so that under
        return (None, True) if q_len > 1 else (None, False)   # torch.compile is_causal is a bool
    if q_len == 1:
        return None, False              # one new token sees everything before it
    return causal_mask(q_len, past + q_len, device), False
