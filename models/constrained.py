"""Grammar-constrained decoding: JSON output enforced token by token (Ollama `format`, OpenAI
`response_format`), with llguidance.

    c = Constraint.schema(lm, {"type": "object", ...})     # or Constraint.json(lm); SchemaError if bad
    generate_tokens(lm.model, [ids], ..., eos_ids=lm.stop_ids(), constraints=[c.matcher()])

Before each sampling step the row's matcher sets every token the grammar forbids to -inf (EOS only
once the JSON is complete); the chosen token is fed back to it, and the row ends as soon as the
grammar is complete (a JSON object's closing brace) -- nothing could follow it but EOS.

Why llguidance (bench/constrained_overhead.py; SmolLM2-135M-Instruct, 49,152 tokens, 2 shared
CPU cores under load, so medians and ratios only):
- per token, model-free replay of the same documents (41-token "any JSON" object, 26-token schema
  object), median of 30: matcher (compute bitmask + accept) xgrammar 0.031 / 0.024 ms, llguidance
  0.025 / 0.033 ms; applying the bitmask (shared code, apply_bitmask_) ~0.03 ms. Together ~0.06 ms
  against ~30 ms per unconstrained decode step on an idle machine: ~0.2%, a tie between the two.
  outlines-core is a regex DFA: "any JSON" is only a depth-3 approximation and took 5.4 s to
  compile (schema 32 ms); it was not a candidate.
- compile: xgrammar 5-25 ms per grammar + ~20 ms tokenizer setup; llguidance ~0.7 ms per grammar
  (lazy lexer: the first masks cost ~0.1-0.2 ms) + ~110-170 ms tokenizer setup, once per model.
- correctness: llguidance refuses schema keywords it cannot enforce ('Unimplemented keys: ["not"]',
  uniqueItems); xgrammar 0.2.8 compiles `not` and `uniqueItems` and ignores them ({"not": {"type":
  "string"}} accepted '"x"', uniqueItems accepted [1, 1]); outlines-core ignored multipleOf and
  uniqueItems. All three enforced maxLength; every greedy output validated.
- last run (bench/results/constrained_overhead.json, load avg ~4-5 on 2 cores, 1 repeat): compile
  xgrammar 31 / 29 ms, llguidance 0.5 / 0.7 ms, outlines-core 9.7 s / 62 ms (json / schema);
  replay per token xgrammar 0.22 / 0.09 ms, llguidance 0.13 / 0.11 ms; end-to-end step times are
  dominated by the load (unconstrained itself 374-1843 ms/token), overhead 0.2-1.6% everywhere.
- footprint: llguidance is one 7.6 MB wheel with no dependencies; xgrammar pulls in triton (~1 GB
  installed), transformers, pydantic and apache-tvm-ffi.
bench/results/constrained_overhead.json holds the end-to-end decode timings of the last run.

The tokenizer's vocabulary reaches llguidance as raw bytes per token id (`token_bytes`): byte-level
BPE pieces ("Ġ" = space) are mapped back to bytes, SentencePiece pieces ("▁", "<0x0A>") likewise,
tiktoken gives them directly; special/control tokens are marked special (never allowed). One
llguidance tokenizer per (tokenizer, stop ids, logits width) and one compiled matcher per schema
(copied per sequence) are cached, so a repeated request pays neither.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import torch

from harness.cli import UserError

# Whitespace between JSON tokens is capped as llama.cpp's json grammar caps it (`ws ::= | " " |
# "\n" [ \t]{0,20}`): a small model could otherwise emit newlines forever inside a valid object.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}
GRAMMAR_CACHE_SIZE = 128
JSON_OBJECT = {"type": "object"}    # what format "json" / json_object means: any JSON object


class SchemaError(UserError):
    """A `format` / `response_format` JSON schema that is not valid, or that constrained decoding
    cannot enforce; the message names what is wrong (the server answers 400)."""


# ----------------------------------------------------------------------------- vocabulary as bytes

def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id stands for in generated text; None for special (control) tokens,
    which never appear in constrained output."""
    if hasattr(tokenizer, "encoding"):     # TiktokenTokenizer
        enc = tokenizer.encoding
        special = set(enc._special_tokens.values())
        return [None if i in special else enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        raise UserError(f"tokenizer {tokenizer.name!r} ({type(tokenizer).__name__}) cannot be used for "
                        "constrained (JSON) decoding: its vocabulary is not readable as bytes")
    added = backend.get_added_tokens_decoder()
    decoder = type(backend.decoder).__name__ if backend.decoder is not None else ""
    byte_level = decoder == "ByteLevel" or "ByteLevel" in str(backend.decoder)
    inverse = _byte_level_decoder() if byte_level else {}
    out: list[bytes | None] = []
    for i in range(tokenizer.vocab_size):
        piece = backend.id_to_token(i)
        if piece is None or (i in added and added[i].special):
            out.append(None)
        elif i in added:                   # a plain added token ("\n\n" in Gemma): its text, whole
            out.append(added[i].content.encode())
        elif byte_level and all(ch in inverse for ch in piece):
            out.append(bytes(inverse[ch] for ch in piece))
        elif byte_level:                   # a piece outside the byte alphabet stands for itself
            out.append(piece.encode())
        else:                              # SentencePiece: ▁ is a space, <0xNN> one raw byte
            m = _BYTE_PIECE.fullmatch(piece)
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode())
    _check_spelling(tokenizer, out)
    return out


SPELLING_PROBE = 'Text {"key": [1, -2.5e3, true, null], "é": "日本 🙂"}\n\n\t  end'


def _check_spelling(tokenizer, vocab: list[bytes | None]) -> None:
    """The bytes of a probe text's tokens must spell the text (SentencePiece may add one leading
    space): else masks would be computed over the wrong strings, and we refuse."""
    ids = tokenizer.encode(SPELLING_PROBE)
    spelled = b"".join(vocab[i] or b"\0" for i in ids)
    if spelled.removeprefix(b" ") != SPELLING_PROBE.encode():
        raise UserError(f"tokenizer {tokenizer.name!r}: cannot read its vocabulary as bytes for "
                        f"constrained (JSON) decoding (a probe text spells {spelled[:60]!r})")


# ----------------------------------------------------------------------------- compiler per tokenizer

class _Vocabulary:
    """llguidance's TokenizerWrapper interface over our tokenizer: bytes per id, special ids, EOS,
    and a tokenize function (llguidance uses it only to spell forced text, never for masks)."""

    def __init__(self, tokenizer, vocab: list[bytes | None], stop_ids: Sequence[int]):
        self.eos_token_id = stop_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, b in enumerate(vocab) if b is None]
        # a special token is spelled by its name; llguidance never matches it against text
        self.tokens = [tokenizer.decode([i]).encode() if b is None else b for i, b in enumerate(vocab)]
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class _Compiler:
    """llguidance's tokenizer for one model, and one compiled matcher per schema (copied per row)."""

    def __init__(self, tokenizer, stop_ids: Sequence[int], width: int):
        import llguidance
        vocab = token_bytes(tokenizer)
        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Vocabulary(tokenizer, vocab, stop_ids)),
            n_vocab=width, eos_token=list(stop_ids))
        self.stop_ids = list(stop_ids)
        self.width = width
        self.matchers: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def compile(self, schema: dict):
        """A fresh matcher for `schema` (compiled once, then cached); SchemaError if llguidance
        cannot enforce it."""
        key = json.dumps(schema, sort_keys=True)
        with self.lock:
            if key in self.matchers:
                self.matchers.move_to_end(key)
                return self.matchers[key]
        llg = self.llg
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as e:
            raise SchemaError(f"invalid JSON schema: {e}") from None
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise SchemaError(f"invalid JSON schema: {_first_line(messages[0])}")
        template = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise SchemaError(f"invalid JSON schema: {_first_line(template.get_error())}")
        with self.lock:
            self.matchers[key] = template
            while len(self.matchers) > GRAMMAR_CACHE_SIZE:
                self.matchers.popitem(last=False)
        return template


def _first_line(message: str) -> str:
    """llguidance's message on one line (a regex error spans several: the pattern, a caret, why)."""
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return text[:400] or "rejected by the grammar compiler"


_compilers: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def _compiler_for(lm) -> _Compiler:
    """The cached compiler for `lm` (a TorchLM: its tokenizer, stop ids and logits width)."""
    tokenizer, stop_ids, width = lm.tokenizer, tuple(lm.stop_ids()), lm.model.config.vocab_size
    with _compilers_lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        compiler = per_tokenizer.get((stop_ids, width))
        if compiler is None:
            compiler = per_tokenizer[(stop_ids, width)] = _Compiler(tokenizer, stop_ids, width)
    return compiler


# ----------------------------------------------------------------------------- public API

def parse_schema(schema: Any) -> dict:
    """`schema` (a dict, or its JSON text) as a dict; SchemaError when it is neither."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SchemaError(f"JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"JSON schema must be an object, got {type(schema).__name__}: {schema!r:.80}")
    return schema


class Constraint:
    """A grammar compiled for one model's tokenizer; `matcher()` gives each sequence its own state."""

    def __init__(self, compiler: _Compiler, template, description: str):
        self._compiler = compiler
        self.grammar = template          # the compiled matcher in its start state (cached, shared)
        self.description = description

    @classmethod
    def json(cls, lm) -> "Constraint":
        """Any JSON object (Ollama `format: "json"`, OpenAI `{"type": "json_object"}`)."""
        compiler = _compiler_for(lm)
        return cls(compiler, compiler.compile(JSON_OBJECT), "json")

    @classmethod
    def schema(cls, lm, schema: Any) -> "Constraint":
        """JSON valid under `schema` (a dict or its JSON text); SchemaError when it is not a valid
        schema or uses a keyword llguidance cannot enforce (it names it: `not`, `uniqueItems`, ...)."""
        compiler = _compiler_for(lm)
        return cls(compiler, compiler.compile(parse_schema(schema)), "schema")

    def matcher(self) -> "Matcher":
        return Matcher(self)


_BITS = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8)
# Row v: what to add to the 8 logits whose allowed-bits are the byte v (low bit first): 0 or -inf.
_BYTE_BIAS = torch.where((torch.arange(256, dtype=torch.uint8)[:, None] & _BITS).bool(), 0.0, float("-inf"))


def apply_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """logits [V] (fp32, CPU) += 0 where the int32 bitmask (bit j of word w: token 32w + j, as
    xgrammar and llguidance write it) allows the token, -inf where it does not. A table lookup per
    byte and one add: branch-free, ~10x faster than masked_fill with an unpredictable mask."""
    rows = bitmask.view(torch.uint8).view(-1).long()          # little-endian: byte k = tokens 8k..8k+7
    logits.add_(_BYTE_BIAS.index_select(0, rows).view(-1)[: logits.shape[-1]].to(logits.device))


class Matcher:
    """One sequence's position in the grammar: `mask_` before sampling, `accept` after."""

    def __init__(self, constraint: Constraint):
        self.matcher = constraint.grammar.deep_copy()
        self.bitmask = torch.full((1, (constraint._compiler.width + 31) // 32), -1, dtype=torch.int32)
        self._nbytes = self.bitmask.numel() * 4

    def mask_(self, logits: torch.Tensor) -> None:
        """Set the logits [V] of every token the grammar forbids next to -inf, in place (EOS is
        allowed only where the JSON is complete)."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self._nbytes)
        if self.matcher.is_error():
            raise RuntimeError(f"grammar matcher failed: {self.matcher.get_error()}")
        apply_bitmask_(logits, self.bitmask)

    def accept(self, token: int) -> bool:
        """Feed the chosen token; True when the grammar is complete and nothing but EOS may follow
        (the caller ends the sequence there)."""
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar matcher rejected token {token}, which its mask allowed: "
                               f"{self.matcher.get_error()}")
        return self.matcher.is_stopped()

    @property
    def completed(self) -> bool:
        """The text so far is a complete match (a JSON document that parses)."""
        return self.matcher.is_accepting()


def from_ollama_format(lm, fmt: Any) -> Constraint | None:
    """Ollama's `format`: "" / None -> None, "json" -> any JSON object, a schema object -> that
    schema; anything else SchemaError."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return Constraint.json(lm)
    if isinstance(fmt, dict):
        return Constraint.schema(lm, fmt)
    raise SchemaError(f'format must be "json" or a JSON schema object, got {fmt!r:.80}')


def from_openai_response_format(lm, response_format: Any) -> Constraint | None:
    """OpenAI's `response_format`: {"type": "text"} / None -> None, {"type": "json_object"} -> any
    JSON object, {"type": "json_schema", "json_schema": {"schema": {...}}} -> that schema."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json(lm)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise SchemaError('response_format {"type": "json_schema"} needs "json_schema": {"name": ..., '
                              '"schema": {...}}')
        return Constraint.schema(lm, spec["schema"])
    raise SchemaError(f'response_format.type must be "text", "json_object" or "json_schema", got {kind!r}')
