"""Sequence classification with a decoder: the class head reads the hidden state of each text's last
real token (causal attention means it has seen the whole text). Shared by the spam trainer and the
LM adapter, so training and scoring cut and pad texts identically."""
from __future__ import annotations

from typing import Sequence

import torch

from models.decoder import Model


def pad_right(token_lists: Sequence[Sequence[int]], pad_id: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] right-padded tokens (each text cut to its first max_length tokens) and [B] lengths."""
    cut = [list(t[:max_length]) or [pad_id] for t in token_lists]
    width = max(len(t) for t in cut)
    tokens = torch.full((len(cut), width), pad_id, dtype=torch.long)
    for i, t in enumerate(cut):
        tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return tokens, torch.tensor([len(t) for t in cut])


def class_logits(model: Model, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """tokens [B, T], lengths [B] -> class logits [B, num_classes] at each row's last real token."""
    hidden = model.hidden_states(tokens)                                   # [B, T, D]
    last = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths.to(tokens.device) - 1]
    return model.logits(last)                                              # [B, C]
