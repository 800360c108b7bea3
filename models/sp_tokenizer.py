"""SentencePiece vocabularies stored in GGUF files (`tokenizer.ggml.model = "llama"`): Gemma, Llama 2,
Mistral, Phi-3.

The GGUF holds tokens, scores and token types, not the `.model` protobuf, and no merges. We rebuild
the tokenizer transformers builds from the same file (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`, transformers/integrations/gguf/gguf_tokenizer_mapping.py) with the `tokenizers`
library, so ids match the reference without transformers at run time:

* a BPE whose merges are recovered from the vocabulary (every split of a token into two tokens,
  best first), with byte fallback (`<0x0A>` pieces for bytes not in the vocabulary) and `▁` for
  spaces. The merge order is the token's score (llama.cpp's SPM rule), except for Gemma, whose
  scores do not follow its merge order; its token order does.
* Gemma spells tokens of 2+ spaces with real spaces; they are respelled `▁▁...`, which is what its
  normalizer (space -> `▁`, no prefix space) produces. Llama-style files get SentencePiece's prefix
  space (Metaspace), Phi-3 its normalizer variant.
* control tokens (`<bos>`, `<start_of_turn>`, `<unused12>`) are special added tokens and user-defined
  ones (`\\n\\n`, `[multimodal]`) plain added tokens: both match whole in raw text.

BOS is never added by `encode`; `add_bos` (`tokenizer.ggml.add_bos_token`, default True for this
model type, as llama.cpp assumes) tells the caller to prepend `bos_id`.
"""
from __future__ import annotations

from typing import Any

from harness.cli import UserError

SPACE = "\u2581"   # ▁, SentencePiece's visible space
CONTROL, USER_DEFINED = 3, 4   # llama.cpp's LLAMA_TOKEN_TYPE_*
GEMMA_ARCHS = {"gemma", "gemma2", "gemma3"}


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two vocabulary tokens, highest-scoring token first;
    ties: longer left piece, longer right piece, then vocabulary ids. The same order as transformers'
    `generate_merges(vocab, vocab_scores)`, so the same BPE, and the same ids."""
    merges = []
    for token, score in scores.items():
        local = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += [(left, right, score) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)   # stable: ties keep order
    return [(left, right) for left, right, _ in merges]


def sp_tokenizer(meta: dict[str, Any], where: str = "GGUF file"):
    """An HFTokenizer (models/tokenizer.py) for the SentencePiece vocabulary in GGUF metadata `meta`
    ({key: value}); `where` names the file in errors."""
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    from models.tokenizer import HFTokenizer

    arch = meta.get("general.architecture", "")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise UserError(f"{where}: no tokenizer.ggml.tokens in its metadata; it carries no tokenizer")
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(scores) != len(tokens) or len(types) != len(tokens):
        raise UserError(f"{where}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} token "
                        "types; the tokenizer metadata is corrupt, fetch the file again")
    gemma = arch in GEMMA_ARCHS
    if gemma:   # "  " -> "▁▁": the spelling its normalizer produces, so lookups and merges meet it
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    rank = {t: -i for i, t in enumerate(tokens)} if gemma else dict(zip(tokens, scores))

    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if gemma and unk_id is not None else None  # transformers sets it for Gemma only
    backend = Backend(models.BPE(vocab=vocab, merges=generate_merges(vocab, rank), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True, dropout=None))
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:   # no prefix space; split after each space, like Gemma's tokenizer.json
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":   # the prefix space comes from a normalizer (transformers' phi3_tokenizer)
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        decode.append(decoders.Strip(content=" ", left=1))
    else:   # Llama 2 / Mistral: SentencePiece's prefix space on the first word
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        decode.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode)
    # the ids the metadata names (an UNKNOWN-type <unk> among them) are special too, as in transformers
    named = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL or i in named])
    # meta's own spelling: a user-defined token respelled above is no longer one (transformers skips it too)
    original = meta["tokenizer.ggml.tokens"]
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(original, types) if ty == USER_DEFINED and t in vocab])

    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise UserError(f"{where}: no tokenizer.ggml.eos_token_id in its metadata; the file cannot say "
                        "where a generation ends")
    return HFTokenizer(backend, name=f"gguf-spm:{arch or 'llama'}", eos_id=int(eos_id),
                       bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                       add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                       chat_template=meta.get("tokenizer.chat_template"), vocab_size=len(tokens))
