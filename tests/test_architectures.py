"""The architecture registry (models/architectures.py) and the Model protocol (models/decoder.py):
every entry is complete and self-consistent, unknown names are one error naming the known ones,
and no module outside the model files and the registry knows which architectures exist."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from models.architectures import ARCHITECTURES, by_gguf_name, by_hf_model_type, lookup
from models.checkpoint import CheckpointError, build_model
from models.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = list(ARCHITECTURES.values())


@pytest.mark.parametrize("find, value, message", [
    (lookup, "phi3", "model.arch: unknown architecture 'phi3'; known: gpt, llama, qwen2, qwen3, gemma3"),
    (by_hf_model_type, "phi3", "model.arch: unknown model_type 'phi3'; known: gpt2, llama, mistral, qwen2, qwen3, gemma3_text, gemma3"),
    (by_gguf_name, "phi3", "model.arch: unknown GGUF architecture 'phi3'; known: gpt2, llama, qwen2, qwen3, gemma3"),
])
def test_unknown_names_list_the_known_ones(find, value, message):
    with pytest.raises(CheckpointError) as e:
        find(value, "model.arch")
    assert str(e.value) == message


def test_unknown_architecture_in_each_file_format_is_one_checkpoint_error(tmp_path):
    import gguf
    from safetensors.torch import save_file
    hf, native = tmp_path / "hf", tmp_path / "native"
    for folder, config in ((hf, {"model_type": "phi3"}), (native, {"architecture": "phi3", "config": {}})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "phi3")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 2).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for path, what in ((hf, "model_type"), (native, "architecture"), (tmp_path / "m.gguf", "GGUF architecture")):
        with pytest.raises(CheckpointError, match=f"unknown {what} 'phi3'; known: "):
            load_model(str(path))


@pytest.mark.parametrize("arch", ENTRIES, ids=lambda a: a.name)
def test_entry_is_consistent(arch):
    keys = {f.name for f in fields(arch.config)}
    assert arch.build.architecture == arch.name
    assert set(arch.hf_keys or {}) <= keys
    for name, overrides in arch.configs.items():
        assert set(overrides) <= keys, name
        with torch.device("meta"):
            model = build_model(arch.name, overrides, name)
        assert type(model).architecture == arch.name and len(model.blocks) == model.config.n_layers
        if arch.gguf_tensors is None:
            continue
        # export and import name the same tensors, and give back every parameter but embedding and head
        state = model.state_dict()
        written = dict(arch.gguf_tensors(model.config, state))
        read = arch.gguf_state(vars(model.config), lambda n: written[n])
        assert set(read) == set(state) - {"tok_emb.weight", "head.weight"}, name
        assert all(read[k].shape == state[k].shape for k in read), name


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_blocks_run_in_parts_equal_hidden_states(name):
    """What the frozen-prefix cache of partial finetuning relies on."""
    model, _, _ = load_model(name)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        x = model.run_blocks(model.embed(ids), 0, 1)
        parts = model.final_norm(model.run_blocks(x, 1))
        assert torch.equal(parts, model.hidden_states(ids))


def test_no_module_outside_the_model_files_names_an_architecture():
    # The files an entry's model and its GGUF hooks are defined in (Gemma 3's formats are a file of their own).
    defined = [getattr(a, h) for a in ENTRIES for h in ("build", "config", "gguf_config", "gguf_state", "gguf_tensors")]
    model_files = {Path(sys.modules[f.__module__].__file__).resolve() for f in defined if f is not None}
    allowed = model_files | {ROOT / "models" / "architectures.py"}
    modules = "|".join(re.escape(a.build.__module__) for a in ENTRIES)
    configs = "|".join(a.config.__name__ for a in ENTRIES)
    pattern = re.compile(rf"architecture ==|\b({configs})\b|\b[A-Z0-9]+_CONFIGS\b|from ({modules}) import")
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for folder in ("harness", "models", "tasks") for path in sorted((ROOT / folder).rglob("*.py"))
            if path.resolve() not in allowed
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
