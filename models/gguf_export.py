"""Write our GPT-2 and Llama models as GGUF files that llama.cpp and Ollama load.

    from models.gguf_export import gguf_vocab, write_gguf
    write_gguf("model.gguf", model, gguf_vocab(tokenizer), dtype="f16", name="my-model")

Tensor names, layouts and metadata follow llama.cpp's convert_hf_to_gguf.py. What every layout
shares is written here: the five sizes, token_embd first and output (untied heads only) last. The
architecture's entry in models/architectures.py gives its llama.cpp name, the rest of its metadata
(`gguf_hparams`) and the tensors in between (`gguf_tensors`, beside its model: e.g. llama's q/k rows
permuted into llama.cpp's interleaved RoPE layout, and Llama-3 RoPE scaling as `rope_freqs`).

The tokenizer is llama.cpp's "gpt2" (byte-level BPE) model with pre-tokenizer "gpt-2" (GPT-2's
regex) or "smollm" (every digit split first); a model loaded from a GGUF file keeps that file's
vocabulary, also a SentencePiece ("llama") one such as Gemma's. Weights are stored [out, in] like nn.Linear; 1-D tensors (norms, biases, rope factors) stay F32
whatever `dtype` says, as llama.cpp's converter keeps them.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch

from harness.cli import UserError
from models.architectures import lookup, with_hook
from models.decoder import Model

QTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "bf16": gguf.GGMLQuantizationType.BF16}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16}


class ExportError(UserError):
    """A model or tokenizer that GGUF (or llama.cpp) cannot represent."""


# ----------------------------------------------------------------------------- tokenizer

@dataclass
class GGUFVocab:
    """Everything llama.cpp's byte-level BPE ("gpt2" tokenizer model) or SentencePiece ("llama")
    reads from the metadata."""
    tokens: list[str]            # byte-level spellings ("Ġthe"), or SentencePiece pieces ("▁the"); index = id
    token_types: list[int]       # gguf.TokenType values
    merges: list[str]            # "left right", in merge order (BPE only)
    pre: str                     # llama.cpp's pre-tokenizer name: "gpt-2", "smollm", ...
    eos_id: int
    bos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = False
    add_eos: bool | None = None
    chat_template: str | None = None
    model: str = "gpt2"          # tokenizer.ggml.model: "gpt2" | "llama" (SentencePiece)
    scores: list[float] | None = None    # SentencePiece piece scores
    add_space_prefix: bool | None = None  # SentencePiece: llama.cpp assumes true when absent (Gemma: false)

    def padded(self, vocab_size: int) -> GGUFVocab:
        """llama.cpp wants one token per embedding row; extra rows become unused [PADn] tokens
        (what the converter writes for padded vocabularies)."""
        if vocab_size < len(self.tokens):
            raise ExportError(f"tokenizer has {len(self.tokens)} tokens but the model only {vocab_size} rows")
        extra = range(len(self.tokens), vocab_size)
        return replace(self, tokens=self.tokens + [f"[PAD{i}]" for i in extra],
                       token_types=self.token_types + [gguf.TokenType.UNUSED] * len(extra),
                       scores=None if self.scores is None else self.scores + [0.0] * len(extra))


@functools.lru_cache(maxsize=1)
def _byte_spelling() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: every byte as a printable character (space -> 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _spell(piece: bytes) -> str:
    table = _byte_spelling()
    return "".join(table[b] for b in piece)


def _merge_pair(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The two parts BPE joins to make `token`: merge its bytes with every lower-ranked merge;
    exactly two parts remain (llama.cpp's converter recovers tiktoken merges the same way)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
        if ranks.get(parts[best] + parts[best + 1], rank) >= rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ExportError(f"BPE token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=4)
def _tiktoken_vocab(encoding) -> GGUFVocab:
    n = encoding.n_vocab
    special = {encoding.encode_single_token(s): s for s in encoding.special_tokens_set}
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(n) if i not in special}
    tokens = [special[i] if i in special else _spell(encoding.decode_single_token_bytes(i)) for i in range(n)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(n)]
    by_rank = sorted((r, t) for t, r in ranks.items() if len(t) > 1)
    merges = [" ".join(map(_spell, _merge_pair(ranks, t, r))) for r, t in by_rank]
    return GGUFVocab(tokens, types, merges, pre="gpt-2", eos_id=-1)


def vocab_from_tiktoken(tok) -> GGUFVocab:
    """GPT-2's tiktoken encoding: tokens and merges rebuilt from its BPE ranks. GPT-2 names
    <|endoftext|> as BOS, EOS and (for batching) padding; it adds no BOS."""
    vocab = _tiktoken_vocab(tok.encoding)
    return replace(vocab, eos_id=tok.eos_id, bos_id=tok.eos_id if tok.bos_id is None else tok.bos_id,
                   pad_id=tok.eos_id, add_bos=bool(tok.add_bos), chat_template=tok.chat_template)


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer we can express (gguf_tokenizer's inverse)."""
    steps = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec]
    last = steps[-1] if steps and steps[-1] else {}
    if last.get("type") == "ByteLevel" and last.get("use_regex", True) and not last.get("add_prefix_space"):
        if len(steps) == 1:
            return "gpt-2"
        if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
            return "smollm"
    raise ExportError(f"tokenizer pre-tokenizer {json.dumps(spec)[:200]} has no llama.cpp equivalent "
                      "(supported: GPT-2 byte-level, optionally after single-digit splitting)")


def vocab_from_tokenizers(tok) -> GGUFVocab:
    """A `tokenizers` byte-level BPE (models.tokenizer.HFTokenizer), read from its JSON form."""
    spec = json.loads(tok.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or spec.get("normalizer") or model.get("byte_fallback") \
            or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise ExportError(f"tokenizer {tok.name!r} is not a plain byte-level BPE; GGUF export supports only that")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    entries = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):  # special -> CONTROL: matched whole, never split
        kind = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        entries[added["id"]] = (added["content"], kind)
    n = max(max(entries) + 1, tok.vocab_size)
    tokens = [entries.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab([t for t, _ in tokens], [int(k) for _, k in tokens], merges, pre, eos_id=tok.eos_id,
                     bos_id=tok.bos_id, pad_id=tok.eos_id, add_bos=bool(tok.add_bos),
                     chat_template=tok.chat_template)


def vocab_from_gguf(metadata: dict) -> GGUFVocab:
    """A GGUF-born tokenizer, byte-level BPE (SmolLM2) or SentencePiece (Gemma): copied field by
    field from its metadata (models/gguf_meta.py)."""
    field = metadata.get

    kind = field("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ExportError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    tokens = field("tokenizer.ggml.tokens")
    return GGUFVocab(tokens, field("tokenizer.ggml.token_type") or [1] * len(tokens),
                     field("tokenizer.ggml.merges", []), field("tokenizer.ggml.pre") or "default",
                     eos_id=field("tokenizer.ggml.eos_token_id"), bos_id=field("tokenizer.ggml.bos_token_id"),
                     pad_id=field("tokenizer.ggml.padding_token_id"), unk_id=field("tokenizer.ggml.unknown_token_id"),
                     # llama.cpp's defaults when the key is absent: BOS for SentencePiece, none for BPE
                     add_bos=bool(field("tokenizer.ggml.add_bos_token", kind == "llama")),
                     add_eos=field("tokenizer.ggml.add_eos_token"), chat_template=field("tokenizer.chat_template"),
                     model=kind, scores=field("tokenizer.ggml.scores") if kind == "llama" else None,
                     add_space_prefix=field("tokenizer.ggml.add_space_prefix"))


def gguf_vocab(tok) -> GGUFVocab:
    """The GGUF vocabulary of one of our tokenizers (models.tokenizer)."""
    if hasattr(tok, "encoding"):
        return vocab_from_tiktoken(tok)
    if hasattr(tok, "backend"):
        return vocab_from_tokenizers(tok)
    raise ExportError(f"tokenizer {getattr(tok, 'name', tok)!r} cannot be written to GGUF")


# ----------------------------------------------------------------------------- tensors

def _tensors(arch, model: Model) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) in file order: the embedding, the architecture's own, the head."""
    s = model.state_dict()
    yield "token_embd.weight", s["tok_emb.weight"]
    yield from arch.gguf_tensors(model.config, s)
    if "head.weight" in s:
        yield "output.weight", s["head.weight"]


def _encode(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    array = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    qtype = QTYPES[dtype] if array.ndim > 1 else gguf.GGMLQuantizationType.F32
    return gguf.quants.quantize(array, qtype), qtype


# ----------------------------------------------------------------------------- metadata

def _add_hparams(w: gguf.GGUFWriter, arch, cfg) -> None:
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    arch.gguf_hparams(w, cfg)


def _add_tokenizer(w: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types([int(t) for t in vocab.token_types])
    if vocab.merges or vocab.model == "gpt2":
        w.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    for add, token_id in ((w.add_bos_token_id, vocab.bos_id), (w.add_eos_token_id, vocab.eos_id),
                          (w.add_unk_token_id, vocab.unk_id), (w.add_pad_token_id, vocab.pad_id)):
        if token_id is not None:
            add(int(token_id))
    w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


# ----------------------------------------------------------------------------- writer

def write_gguf(path: str | Path, model: Model, vocab: GGUFVocab, dtype: str = "f32", name: str = "",
               overwrite: bool = False, progress: bool = True) -> Path:
    """Write `model` (fp32 weights, any device) and its vocabulary as one GGUF file, atomically:
    into a temporary sibling, fsynced, then renamed over `path`."""
    path = Path(path)
    if dtype not in QTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; use one of {', '.join(QTYPES)}")
    if getattr(model.config, "num_classes", 0):
        raise ExportError("a classifier checkpoint (num_classes > 0) cannot be exported: GGUF has no "
                          "class heads, only a vocabulary head")
    arch = lookup(model.architecture)
    if arch.gguf_tensors is None:
        raise ExportError(f"architecture {arch.name!r} has no GGUF layout here "
                          f"({', '.join(with_hook('gguf_tensors'))})")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; pass overwrite=true or choose another output file")
    vocab = vocab.padded(model.config.vocab_size)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result should read like any new file
    writer = gguf.GGUFWriter(tmp, arch.gguf_names[0])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        writer.add_file_type(FILE_TYPES[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, arch, model.config)
        _add_tokenizer(writer, vocab)
        for tensor, weights in _tensors(arch, model):
            data, qtype = _encode(weights, dtype)
            writer.add_tensor(tensor, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.flush()
        for f in writer.fout or ():
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
