"""GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, tied vocabulary head.

Follows "Build a Large Language Model (From Scratch)" ch04 and nanoGPT. Weights use our own names;
the end of this file maps Hugging Face GPT-2 (Conv1D, transposed) and llama.cpp's `gpt2` GGUF
layout onto them, for the loaders and the exporter (wired up in models/architectures.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import decoder
from models.cache import KVCache, attention_mask
from models.checkpoint import float_or_raw, strip_prefix


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    dropout: float = 0.0        # 0 by default: dropout costs speed and GPT-2 finetunes fine without it
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # > 0: a classifier, the vocabulary head replaced by num_classes outputs (spam finetuning, ch06)
    num_classes: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads


# The four published GPT-2 sizes (the book's GPT_CONFIG_124M etc.) and tiny CPU configs for tests.
GPT_CONFIGS: dict[str, dict] = {
    "gpt2-124m": dict(d_model=768, n_layers=12, n_heads=12),
    "gpt2-355m": dict(d_model=1024, n_layers=24, n_heads=16),
    "gpt2-774m": dict(d_model=1280, n_layers=36, n_heads=20),
    "gpt2-1558m": dict(d_model=1600, n_layers=48, n_heads=25),
    "gpt-tiny": dict(context_length=256, d_model=64, n_layers=2, n_heads=4),
    "gpt-small": dict(context_length=256, d_model=256, n_layers=4, n_heads=4),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x, layer: int, cache: KVCache | None, attn_mask: torch.Tensor | None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        if cache is not None:
            k, v = cache.update(layer, k, v)                                          # [B, H, S, Dh]
        is_causal = False
        if attn_mask is None:
            attn_mask, is_causal = attention_mask(cache, T, x.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's tanh GELU


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, layer, cache, attn_mask):
        x = x + self.drop(self.attn(self.ln1(x), layer, cache, attn_mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    architecture = "gpt"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = decoder.output_head(cfg)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """tokens [B, T] -> token + position embeddings [B, T, d_model] (positions None: start .. start + T)."""
        # Checked on the host where it can be (positions None: every training step), since reading
        # positions.max() back waits for the GPU and splits a torch.compile graph.
        if positions is None:
            too_long = start + tokens.shape[1] > self.config.context_length
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        else:
            too_long = int(positions.max()) >= self.config.context_length
        if too_long:
            raise ValueError(f"sequence longer than the model's context ({self.config.context_length})")
        return self.drop(self.tok_emb(tokens) + self.pos_emb(positions))

    def run_blocks(self, x: torch.Tensor, first: int = 0, last: int | None = None, *, cache: KVCache | None = None,
                   positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks [first, last) on x [B, T, d_model]; positions entered in `embed` already."""
        for i in range(first, len(self.blocks) if last is None else last):
            x = self.blocks[i](x, i, cache, attn_mask)
        return x

    # The rest of the Model protocol, shared by the architectures (models/decoder.py).
    hidden_states, logits, forward, new_cache = (decoder.hidden_states, decoder.logits, decoder.forward,
                                                 decoder.new_cache)


# --- Hugging Face and GGUF files (the "gpt" entry of models/architectures.py) ---------------------

# Our config keys -> HF config.json's, to name the file's own key when a value is refused.
HF_KEYS = {"vocab_size": "vocab_size", "context_length": "n_positions", "d_model": "n_embd",
           "n_layers": "n_layer", "n_heads": "n_head", "norm_eps": "layer_norm_epsilon"}
# Our block parameters -> llama.cpp's gpt2 tensors (each with weight and bias), in its file order.
GGUF_BLOCK = {"ln1": "attn_norm", "attn.qkv": "attn_qkv", "attn.proj": "attn_output",
              "ln2": "ffn_norm", "mlp.fc": "ffn_up", "mlp.proj": "ffn_down"}


def from_hf(cfg: dict, folder) -> tuple[dict, Callable[[dict], dict]]:
    """(our config, HF state_dict -> ours) for a GPT-2 config.json."""
    config = {ours: cfg[HF_KEYS[ours]] for ours in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads")}
    config["norm_eps"] = cfg.get("layer_norm_epsilon", 1e-5)
    return config, lambda state: convert_hf(state, config["n_layers"])


def convert_hf(hf: dict, n_layers: int) -> dict[str, torch.Tensor]:
    """HF GPT-2 stores Linear layers as Conv1D ([in, out]); ours are nn.Linear ([out, in])."""
    hf = strip_prefix(hf, "transformer.")
    out = {"tok_emb.weight": hf["wte.weight"], "pos_emb.weight": hf["wpe.weight"],
           "final_norm.weight": hf["ln_f.weight"], "final_norm.bias": hf["ln_f.bias"]}
    pairs = {"ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    for i in range(n_layers):
        for theirs, ours in pairs.items():
            w = hf[f"h.{i}.{theirs}.weight"]
            out[f"blocks.{i}.{ours}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()
            out[f"blocks.{i}.{ours}.bias"] = hf[f"h.{i}.{theirs}.bias"]
    return out


def hf_tokenizer(folder):
    """HF GPT-2 folders ship GPT-2's own BPE (vocab.json + merges.txt), which is ours."""
    from models.tokenizer import gpt2_tokenizer
    return gpt2_tokenizer()


def gguf_config(header, config: dict) -> dict:
    """`config` (the keys every GGUF gives, models/gguf_import.py) completed from the metadata."""
    return config | {"norm_eps": float_or_raw(header.get("attention.layer_norm_epsilon", 1e-5))}


def gguf_state(config: dict, t: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors but the embedding and vocabulary head, from llama.cpp's gpt2 layout (fused
    attn_qkv, Linear weights [out, in] as ours); t(name) -> tensor (a meta tensor for shapes alone)."""
    state = {"pos_emb.weight": t("position_embd.weight"), "final_norm.weight": t("output_norm.weight"),
             "final_norm.bias": t("output_norm.bias")}
    for i in range(config["n_layers"]):
        for ours, theirs in GGUF_BLOCK.items():
            for p in ("weight", "bias"):
                state[f"blocks.{i}.{ours}.{p}"] = t(f"blk.{i}.{theirs}.{p}")
    return state


def gguf_hparams(writer, cfg: GPTConfig) -> None:
    """Metadata beyond the sizes every GGUF holds (models/gguf_export.py)."""
    writer.add_feed_forward_length(4 * cfg.d_model)
    writer.add_layer_norm_eps(cfg.norm_eps)


def gguf_tensors(cfg: GPTConfig, s: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """gguf_state's inverse: (llama.cpp name, tensor) in the order its converter writes them."""
    yield "position_embd.weight", s["pos_emb.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in GGUF_BLOCK.items():
            weight = s[f"blocks.{i}.{ours}.weight"]
            yield f"blk.{i}.{theirs}.weight", weight
            # llama.cpp requires every gpt2 bias; a bias-free qkv (qkv_bias=False) is a zero bias
            yield f"blk.{i}.{theirs}.bias", s.get(f"blocks.{i}.{ours}.bias", torch.zeros(weight.shape[0]))
    yield "output_norm.weight", s["final_norm.weight"]
    yield "output_norm.bias", s["final_norm.bias"]
