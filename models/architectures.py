"""The architecture registry: one `Architecture` entry per model file, and the only place that knows
which architectures exist.

Loaders, the exporter, serving and the trainers look an architecture up here (by our name, an HF
config.json `model_type` or a GGUF `general.architecture`) and call the entry's hooks; none of them
branches on an architecture, and the torch side of a model is used only through the `Model`
protocol (models/decoder.py). So adding an architecture is one model file (or two: Gemma 3 keeps its
file formats in models/gemma3_formats.py) plus one entry below:

    Architecture(name="qwen3", config=Qwen3Config, build=Qwen3, configs=QWEN3_CONFIGS,
                 hf_model_types=("qwen3",), hf_keys=qwen3.HF_KEYS, from_hf=qwen3.from_hf,
                 gguf_names=("qwen3",), gguf_config=qwen3.gguf_config, gguf_state=qwen3.gguf_state,
                 gguf_hparams=qwen3.gguf_hparams, gguf_tensors=qwen3.gguf_tensors,
                 model_info=qwen3.model_info)

The fields (a hook left None means the architecture lacks that format, and is refused by name):

- name: ours: config.json's "architecture" in our checkpoint folders, `train.model.arch`, and the
  model class's `architecture` attribute.
- config: the config dataclass. Field names are shared across architectures where the meaning is
  (models/shapes.py checks vocab_size, d_model, n_heads, n_kv_heads, rope_base, ... by name).
- build: the model class (or a builder function): build(config) -> a `Model`.
- configs: named configs, {name: overrides of the dataclass defaults} (`train.model.config`,
  the registry's random-init test models).
- hf_model_types: the config.json `model_type` values read as this architecture.
- hf_keys: {our config key: config.json's key}, so that a refused value is named as the file names it.
- from_hf(hf_config: dict, folder) -> (our config as a dict, convert(HF state_dict) -> ours). convert
  must go through meta tensors too: the shapes are checked before any tensor is read.
- hf_tokenizer(folder) -> tokenizer, for folders without tokenizer.json (None: the folder's own).
- gguf_names: `general.architecture` values read as this architecture. The first is what export
  writes, the Ollama family `harness.serve` reports and the prefix of its model_info keys.
- gguf_config(header, config) -> config: `config` holds what every GGUF gives (vocab_size,
  context_length, d_model, n_layers, n_heads, tie_embeddings; models/gguf_import.py); add the rest
  from header.get("<key without the arch prefix>"), header.field("<full key>") and header.shapes.
- gguf_state(config, t) -> our state_dict but tok_emb and head (which every layout names alike),
  from t(llama.cpp tensor name); t gives meta tensors for the shape check, real ones after it.
- gguf_check(config, t, header): checks that need tensor data, run after the shape check (optional).
- gguf_hparams(writer, config): export metadata beyond the five sizes every GGUF holds.
- gguf_tensors(config, state_dict) -> (llama.cpp name, tensor) pairs but token_embd and output, in
  file order: gguf_state's inverse.
- model_info(config) -> Ollama's /api/show model_info keys beyond the common ones, without the
  family prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from models import gemma3, gemma3_formats, gpt, llama, qwen2, qwen3
from models.checkpoint import CheckpointError


@dataclass(frozen=True)
class Architecture:
    name: str
    config: type
    build: Callable[[Any], torch.nn.Module]
    configs: Mapping[str, dict]
    hf_model_types: tuple[str, ...] = ()
    hf_keys: Mapping[str, str] | None = None
    from_hf: Callable[[dict, Path], tuple[dict, Callable[[dict], dict]]] | None = None
    hf_tokenizer: Callable[[Path], Any] | None = None
    gguf_names: tuple[str, ...] = ()
    gguf_config: Callable[[Any, dict], dict] | None = None
    gguf_state: Callable[[dict, Callable[[str], torch.Tensor]], dict] | None = None
    gguf_check: Callable[[dict, Callable[[str], torch.Tensor], Any], None] | None = None
    gguf_hparams: Callable[[Any, Any], None] | None = None
    gguf_tensors: Callable[[Any, dict], Iterator[tuple[str, torch.Tensor]]] | None = None
    model_info: Callable[[Any], dict] = lambda config: {}

    @property
    def family(self) -> str:
        """Ollama's name for it, which is the GGUF architecture name."""
        return self.gguf_names[0] if self.gguf_names else self.name


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(name="gpt", config=gpt.GPTConfig, build=gpt.GPT, configs=gpt.GPT_CONFIGS,
                 hf_model_types=("gpt2",), hf_keys=gpt.HF_KEYS, from_hf=gpt.from_hf, hf_tokenizer=gpt.hf_tokenizer,
                 gguf_names=("gpt2",), gguf_config=gpt.gguf_config, gguf_state=gpt.gguf_state,
                 gguf_hparams=gpt.gguf_hparams, gguf_tensors=gpt.gguf_tensors),
    Architecture(name="llama", config=llama.LlamaConfig, build=llama.Llama, configs=llama.LLAMA_CONFIGS,
                 hf_model_types=("llama", "mistral"), hf_keys=llama.HF_KEYS, from_hf=llama.from_hf,
                 gguf_names=("llama",), gguf_config=llama.gguf_config, gguf_state=llama.gguf_state,
                 gguf_check=llama.gguf_check, gguf_hparams=llama.gguf_hparams, gguf_tensors=llama.gguf_tensors,
                 model_info=llama.model_info),
    # Llama's model and config; an entry of its own for llama.cpp's unpermuted qwen2 layout.
    Architecture(name="qwen2", config=llama.LlamaConfig, build=qwen2.Qwen2, configs=qwen2.NAMED_CONFIGS,
                 hf_model_types=qwen2.HF_MODEL_TYPES, hf_keys=qwen2.HF_KEYS, from_hf=qwen2.from_hf,
                 gguf_names=("qwen2",), gguf_config=qwen2.gguf_config, gguf_state=qwen2.gguf_state,
                 gguf_hparams=qwen2.gguf_hparams, gguf_tensors=qwen2.gguf_tensors, model_info=qwen2.model_info),
    Architecture(name="qwen3", config=qwen3.Qwen3Config, build=qwen3.Qwen3, configs=qwen3.NAMED_CONFIGS,
                 hf_model_types=qwen3.HF_MODEL_TYPES, hf_keys=qwen3.HF_KEYS, from_hf=qwen3.from_hf,
                 gguf_names=("qwen3",), gguf_config=qwen3.gguf_config, gguf_state=qwen3.gguf_state,
                 gguf_hparams=qwen3.gguf_hparams, gguf_tensors=qwen3.gguf_tensors, model_info=qwen3.model_info),
    # The model in models/gemma3.py, its files in models/gemma3_formats.py.
    Architecture(name="gemma3", config=gemma3.Gemma3Config, build=gemma3.Gemma3, configs=gemma3.NAMED_CONFIGS,
                 hf_model_types=gemma3_formats.HF_MODEL_TYPES, hf_keys=gemma3_formats.HF_KEYS,
                 from_hf=gemma3_formats.from_hf, gguf_names=("gemma3",), gguf_config=gemma3_formats.gguf_config,
                 gguf_state=gemma3_formats.gguf_state, gguf_hparams=gemma3_formats.gguf_hparams,
                 gguf_tensors=gemma3_formats.gguf_tensors, model_info=gemma3_formats.model_info),
)}


def _find(key: str, value, source: str, names: Callable[[Architecture], tuple[str, ...]]) -> Architecture:
    """The one entry whose `names` hold `value`, or a CheckpointError naming every known value."""
    for arch in ARCHITECTURES.values():
        if value in names(arch):
            return arch
    known = ", ".join(n for a in ARCHITECTURES.values() for n in names(a))
    raise CheckpointError(f"{source + ': ' if source else ''}unknown {key} {value!r}; known: {known}")


def lookup(name: str, source: str = "") -> Architecture:
    """By our name (checkpoint folders, train.model.arch); `source` names where it was read."""
    return _find("architecture", name, source, lambda a: (a.name,))


def by_hf_model_type(model_type, source: str = "") -> Architecture:
    return _find("model_type", model_type, source, lambda a: a.hf_model_types)


def by_gguf_name(gguf_name, source: str = "") -> Architecture:
    return _find("GGUF architecture", gguf_name, source, lambda a: a.gguf_names)


def with_hook(hook: str) -> list[str]:
    """Our names of the architectures that have `hook` (e.g. "gguf_tensors": the exportable ones)."""
    return [a.name for a in ARCHITECTURES.values() if getattr(a, hook) is not None]
