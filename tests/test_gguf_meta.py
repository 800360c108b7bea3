"""models/gguf_meta.py's GGUF header reader against gguf.GGUFReader, the reference it replaces on the
load path: the same metadata, the same tensor table (names, dims, ggml types, offsets) and views of
the same bytes in the same dtype and shape, on the staged SmolLM2 (Q4_1), gemma3-270m (Q4_K_M),
our tiny exports of every exportable architecture and a hand-written file with a custom alignment;
bad files give a CheckpointError naming the file."""
from __future__ import annotations

import itertools

import gguf
import numpy as np
import pytest
import torch

from models.architectures import lookup, with_hook
from models.checkpoint import CheckpointError, build_model
from models.gguf_meta import read_gguf, read_metadata


def assert_same_as_gguf_reader(path, nested: dict | None = None) -> None:
    """`nested`: arrays of arrays, which GGUFReader's contents() flattens and we keep as they are."""
    ours, reader = read_gguf(path), gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")} | (nested or {})
    assert ours.metadata == fields
    assert read_metadata(path) == fields
    assert ours.data_offset == reader.data_offset and ours.alignment == reader.alignment
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert (info.dims, info.ggml_type, info.offset, info.n_bytes) == (
            tuple(int(d) for d in t.shape), t.tensor_type, t.data_offset, t.n_bytes), t.name
        view = ours.data(t.name)
        assert (view.dtype, view.shape) == (t.data.dtype, t.data.shape), t.name
        assert np.array_equal(view.view(np.uint8), t.data.view(np.uint8)), t.name   # bitwise, NaNs too


def test_smollm2_q4_1(smollm2_path):
    assert_same_as_gguf_reader(smollm2_path)


def test_gemma3_270m_q4_k_m():
    from models.registry import fetch
    try:
        path = fetch("gemma3-270m")
    except Exception as e:  # absent and not fetchable (offline)
        pytest.skip(f"gemma3-270m unavailable: {e}")
    assert_same_as_gguf_reader(path)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> list:
    """Seed-0 tiny models of every exportable architecture, the dtypes export writes taken in turn
    (GGUFReader spends ~3 s on each file's 50k-token vocabulary: one file per architecture)."""
    from models.gguf_export import QTYPES, gguf_vocab, write_gguf
    from models.tokenizer import gpt2_tokenizer
    folder, vocab, paths = tmp_path_factory.mktemp("tiny"), gguf_vocab(gpt2_tokenizer()), []
    for arch, dtype in zip(with_hook("gguf_tensors"), itertools.cycle(QTYPES)):
        torch.manual_seed(0)
        model = build_model(arch, lookup(arch).configs[f"{arch}-tiny"])
        paths.append(write_gguf(folder / f"{arch}-{dtype}.gguf", model, vocab, dtype=dtype, progress=False))
    return paths


def test_tiny_exports(tiny_exports):
    for path in tiny_exports:
        assert_same_as_gguf_reader(path)


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory):
    """Plain and quantized types, 1-3 dims, 64-byte alignment: what export never writes."""
    Q = gguf.GGMLQuantizationType
    path = tmp_path_factory.mktemp("odd") / "odd.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_array("harness.test.nested", [[1, 2], [3]])
    w.add_tensor("plain.i32", np.arange(7, dtype=np.int32))
    w.add_tensor("plain.f16", rng.standard_normal((3, 5)).astype(np.float16))
    for q in (Q.Q8_0, Q.Q4_0, Q.Q5_1, Q.BF16):
        x = rng.standard_normal((2, 3, 64)).astype(np.float32)
        w.add_tensor(f"quant.{q.name}", gguf.quants.quantize(x, q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_custom_alignment_and_types(odd_file):
    assert read_gguf(odd_file).alignment == 64
    assert_same_as_gguf_reader(odd_file, nested={"harness.test.nested": [[1, 2], [3]]})


@pytest.mark.parametrize("where", ["empty", "magic", "counts", "metadata", "tensor table", "tensor data"])
def test_a_cut_file_names_itself(odd_file, tmp_path, where):
    data, start = odd_file.read_bytes(), read_gguf(odd_file).data_offset
    cut = {"empty": 0, "magic": 3, "counts": 20, "metadata": 40, "tensor table": start - 80,
           "tensor data": len(data) - 100}[where]
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    for read in (read_gguf, read_metadata) if cut <= 40 else (read_gguf,):
        with pytest.raises(CheckpointError, match=rf"^cannot read GGUF file {bad}: .*\(truncated or not a GGUF"):
            read(bad)


def test_not_a_gguf_and_a_big_endian_one(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match=f"^cannot read GGUF file {bad}: no GGUF magic"):
        read_gguf(bad)
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(32))
    with pytest.raises(CheckpointError, match="big-endian"):
        read_gguf(bad)
