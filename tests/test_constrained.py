"""Grammar-constrained JSON decoding (models/constrained.py) on SmolLM2-135M-Instruct: sampled
outputs always validate against the schema, format "json" parses, unconstrained decoding is
untouched, bad schemas are a SchemaError (a UserError: the server's 400)."""
from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from harness.cli import UserError
from models.constrained import (Constraint, SchemaError, from_ollama_format,
                                from_openai_response_format, token_bytes)
from models.generate import generate_tokens
from test_sp_tokenizer import llama_gguf  # noqa: F401  (fixture: a tiny SentencePiece GGUF)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
}


def chat_ids(lm, text: str) -> list[int]:
    return lm.encode(lm.chat_prompt([{"role": "user", "content": text}]))


def test_schema_sampled_twenty_rows_all_validate(smollm2_lm):
    lm = smollm2_lm
    constraint = Constraint.schema(lm, SCHEMA)
    ids = chat_ids(lm, "Describe a person as JSON with a name, an age and a favorite color.")
    # twenty rows in one batch, each with a matcher of its own (the batch runs what 20 calls would)
    outs = generate_tokens(lm.model, [ids] * 20, max_new_tokens=96, eos_ids=lm.stop_ids(), temperature=0.8,
                           generator=torch.Generator().manual_seed(0),
                           constraints=[constraint.matcher() for _ in range(20)])
    texts = [lm.decode(out) for out in outs]
    for row, text in enumerate(texts):
        jsonschema.validate(json.loads(text), SCHEMA)   # raises with the seed's text in the report
    assert len(set(texts)) > 1, "temperature 0.8 over 20 seeds gave one text: sampling is not happening"


def test_format_json_greedy_parses_and_ends_at_the_closing_brace(smollm2_lm):
    lm = smollm2_lm
    ids = chat_ids(lm, "List three fruits and their colors as a JSON object.")
    out = generate_tokens(lm.model, [ids], max_new_tokens=96, eos_ids=lm.stop_ids(),
                          constraints=[Constraint.json(lm).matcher()])[0]
    text = lm.decode(out)
    assert isinstance(json.loads(text), dict), text
    assert text.rstrip().endswith("}") and lm.eos_id not in out


# generate_tokens before constraints existed (commit 110d899), on this prompt: greedy, and
# temperature 0.8 with seed 7. Unconstrained decoding must stay token-identical.
BEFORE_GREEDY = [504, 7302, 314, 253, 3861, 284, 9764, 582, 28, 582, 338, 805]
BEFORE_SAMPLED = [2122, 506, 253, 24594, 282, 4683, 42, 4461, 28, 6294, 2034, 365]


def test_unconstrained_decoding_unchanged(smollm2_lm):
    lm = smollm2_lm
    ids = chat_ids(lm, "Name a colour.")
    kw = dict(max_new_tokens=12, eos_ids=lm.stop_ids())
    assert generate_tokens(lm.model, [ids], **kw) == [BEFORE_GREEDY]
    assert generate_tokens(lm.model, [ids], constraints=[None], **kw) == [BEFORE_GREEDY]
    sampled = generate_tokens(lm.model, [ids], temperature=0.8, generator=torch.Generator().manual_seed(7), **kw)
    assert sampled == [BEFORE_SAMPLED]


def test_mask_allows_eos_only_when_complete(smollm2_lm):
    lm = smollm2_lm
    width, eos = lm.model.config.vocab_size, lm.eos_id
    matcher = Constraint.schema(lm, SCHEMA).matcher()
    tokens = lm.tokenizer.encode('{"name": "Al", "age": 30, "color": "red"}')
    for i, t in enumerate(tokens):
        logits = torch.zeros(width)
        matcher.mask_(logits)
        assert logits[t] == 0, f"token {i} ({lm.decode([t])!r}) of a valid document was masked"
        assert logits[eos] == float("-inf"), f"EOS allowed after {lm.decode(tokens[:i])!r}"
        assert logits[lm.tokenizer.encode("<|im_start|>")[0]] == float("-inf")   # control tokens never
        assert matcher.accept(t) == (i == len(tokens) - 1)
    logits = torch.zeros(width)
    matcher.mask_(logits)
    assert (logits == 0).nonzero().flatten().tolist() == [eos]
    bad = Constraint.schema(lm, SCHEMA).matcher()
    logits = torch.zeros(width)
    bad.mask_(logits)
    assert logits[lm.tokenizer.encode("[")[0]] == float("-inf")       # the schema wants an object


def test_token_bytes_spell_the_text(smollm2_lm):
    from models.tokenizer import gpt2_tokenizer
    text = 'Hi {"a": [1, 2.5e-3], "é": "日本語 🙂"}\n\n\t  end'
    for tok in (smollm2_lm.tokenizer, gpt2_tokenizer()):
        vocab = token_bytes(tok)
        assert len(vocab) == tok.vocab_size
        assert b"".join(vocab[i] for i in tok.encode(text)) == text.encode()
        assert vocab[tok.eos_id] is None                         # special: never generated as text


@pytest.mark.parametrize("schema, says", [
    ({"type": "foo"}, "Invalid type: foo"),
    ({"type": "object", "required": "name"}, "Expected array for 'required'"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}, "unclosed group"),
    ({"enum": []}, "Unsatisfiable schema"),
    ({"type": "integer", "not": {"const": 3}}, 'Unimplemented keys: ["not"]'),   # never silently ignored
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"$ref": "#/$defs/missing"}, "does not exist"),
    ('{"type": ', "not valid JSON"),
    ([1, 2], "must be an object"),
])
def test_invalid_schema_is_a_user_error(smollm2_lm, schema, says):
    with pytest.raises(SchemaError) as info:
        Constraint.schema(smollm2_lm, schema)
    assert isinstance(info.value, UserError)
    assert says in str(info.value), str(info.value)


def test_compiled_grammars_are_cached(smollm2_lm):
    a = Constraint.schema(smollm2_lm, SCHEMA)
    b = Constraint.schema(smollm2_lm, json.dumps(SCHEMA))     # JSON text of the same schema
    assert a.grammar is b.grammar
    assert Constraint.json(smollm2_lm).grammar is Constraint.json(smollm2_lm).grammar


def test_request_formats(smollm2_lm):
    lm = smollm2_lm
    assert from_ollama_format(lm, None) is None and from_ollama_format(lm, "") is None
    assert from_ollama_format(lm, "json").description == "json"
    assert from_ollama_format(lm, SCHEMA).description == "schema"
    with pytest.raises(SchemaError, match="format must be"):
        from_ollama_format(lm, "yaml")
    assert from_openai_response_format(lm, None) is None
    assert from_openai_response_format(lm, {"type": "text"}) is None
    assert from_openai_response_format(lm, {"type": "json_object"}).description == "json"
    spec = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    assert from_openai_response_format(lm, spec).grammar is Constraint.schema(lm, SCHEMA).grammar
    with pytest.raises(SchemaError, match="json_schema"):
        from_openai_response_format(lm, {"type": "json_schema"})
    with pytest.raises(SchemaError, match="response_format.type"):
        from_openai_response_format(lm, {"type": "xml"})


def test_token_bytes_sentencepiece(llama_gguf):
    """A SentencePiece vocabulary (▁ for spaces, <0xNN> byte pieces, control tokens) as bytes."""
    from models.tokenizer import gguf_tokenizer
    tok = gguf_tokenizer(llama_gguf)
    vocab = token_bytes(tok)
    text = 'the cat {"x": "héllo 🙂"}\n'
    assert b"".join(vocab[i] for i in tok.encode(text)) == b" " + text.encode()   # SentencePiece's prefix space
    assert vocab[tok.eos_id] is None and vocab[tok.encode("<|user|>")[0]] is None
    assert vocab[3 + 0x41] == b"A"                                                 # <0x41>
