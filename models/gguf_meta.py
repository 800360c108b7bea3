"""A GGUF file's header, read fast enough for a 262k-token vocabulary: its metadata and its tensor
table, with memory-mapped numpy views of each tensor's raw bytes.

`gguf.GGUFReader` builds a numpy view per metadata array element: 13 s on Gemma 3's 262,144 tokens on
these machines. This walks the header with `struct` over an mmap instead (well under a second). The
layout is GGUF v2/v3, little-endian: magic, version u32, tensor count u64, key/value count u64, then
each key (u64 length + UTF-8), its value type u32 and its value; arrays are element type u32, count
u64, elements. Then the tensor table: per tensor its name, n_dims u32, dims u64 each (the fastest-
varying first), ggml type u32 and data offset u64, counted from the start of the data section, which
begins at the first multiple of `general.alignment` (default 32) after the table.

read_metadata is the metadata alone (the tokenizer's); read_gguf adds the tensor table (the loader's).
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# value type -> struct format of the fixed-size types (8 is string, 9 array)
_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. dims are GGUF's order (row length first); shape is numpy's."""
    name: str
    dims: tuple[int, ...]
    ggml_type: Any       # gguf.GGMLQuantizationType
    offset: int          # of its first byte in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dims))


@dataclass
class GGUFFile:
    """The header of an open GGUF file; data() views tensor bytes in the memory map, copying nothing."""
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]   # in file order
    alignment: int
    data_offset: int                 # where the data section starts
    _buf: Any                        # the mmap the views point into

    def data(self, name: str):
        """The tensor's bytes as `gguf.quants.dequantize` takes them, like GGUFReader's `data`: the
        plain types (F32, F16, I8, ...) as that numpy dtype in numpy's shape, the quantized ones as
        uint8 rows of whole blocks. Read-only."""
        import numpy as np
        info = self.tensors[name]
        dtype, shape = _layout(info)
        return np.frombuffer(self._buf, dtype=dtype, count=info.n_bytes // np.dtype(dtype).itemsize,
                             offset=info.offset).reshape(shape)


def _plain_dtypes() -> dict:
    """ggml type -> numpy dtype of the unquantized types (those GGUFReader does not view as bytes)."""
    import numpy as np
    from gguf import GGMLQuantizationType as T
    return {T.F16: np.float16, T.F32: np.float32, T.F64: np.float64,
            T.I8: np.int8, T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}


def _layout(info: TensorInfo) -> tuple[Any, tuple[int, ...]]:
    import numpy as np
    from gguf.quants import quant_shape_to_byte_shape
    plain = _plain_dtypes().get(info.ggml_type)
    if plain is not None:
        return plain, info.shape
    return np.uint8, quant_shape_to_byte_shape(info.shape, info.ggml_type)


def _unreadable(path: Path, e: Exception):
    from models.checkpoint import CheckpointError   # here, not at the top: tokenizers need no torch
    return CheckpointError(f"cannot read GGUF file {path}: {e} (truncated or not a GGUF file?)")


_ERRORS = (OSError, struct.error, UnicodeDecodeError, ValueError, IndexError, KeyError)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """{key: value} of every metadata entry; arrays become lists. Raises CheckpointError naming the
    file when it is not a GGUF v2/v3 file or is cut short."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _header(buf)[0]
    except _ERRORS as e:
        raise _unreadable(path, e) from None


def read_gguf(path: str | Path) -> GGUFFile:
    """The metadata and tensor table of a GGUF file, its tensor data memory-mapped. Raises
    CheckpointError naming the file when it is not a GGUF v2/v3 file, is cut short (a tensor's data
    past its end included) or its tensor table is inconsistent."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)   # stays open while views exist
        try:
            return _tensor_table(buf, path, *_header(buf))
        except BaseException:
            buf.close()
            raise
    except _ERRORS as e:
        raise _unreadable(path, e) from None


def _header(buf) -> tuple[dict[str, Any], int, int]:
    """(metadata, tensor count, offset of the tensor table)."""
    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic at its start; pass a .gguf file")
    version, n_tensors, count = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        endian = " (a big-endian file: only little-endian ones are read)" if version & 0xFFFF == 0 else ""
        raise ValueError(f"GGUF v{version}{endian}; only v2 and v3 are read (re-export it with a current llama.cpp)")
    pos, out = 24, {}
    for _ in range(count):
        key, pos = _string(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        out[key], pos = _value(buf, pos + 4, kind)
    return out, n_tensors, pos


def _tensor_table(buf, path: Path, metadata: dict, n_tensors: int, pos: int) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType
    entries = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        try:
            entries.append((name, dims, GGMLQuantizationType(kind), offset))
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown ggml type {kind}") from None
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment={alignment!r} is not a power of two")
    start = -(-pos // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in entries:
        if name in tensors:
            raise ValueError(f"tensor {name!r} appears twice in its tensor table")
        block, size = GGML_QUANT_SIZES[kind]
        info = TensorInfo(name, tuple(dims), kind, start + offset, math.prod(dims) * size // block)
        _layout(info)   # a quantized row that is not whole blocks raises ValueError here
        if info.offset + info.n_bytes > len(buf):
            raise ValueError(f"tensor {name!r}'s data runs past the end of the file")
        tensors[name] = info
    return GGUFFile(path, metadata, tensors, alignment, start, buf)


def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + n
    if end > len(buf):
        raise ValueError(f"string at byte {pos} runs past the end of the file")
    return buf[pos + 8:end].decode("utf-8"), end


def _value(buf, pos: int, kind: int) -> tuple[Any, int]:
    if kind in _FORMAT:
        fmt = "<" + _FORMAT[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind} at byte {pos}")
    elem, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if elem in _FORMAT:
        fmt = f"<{n}{_FORMAT[elem]}"
        return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
    if elem == _STRING:
        values = []
        for _ in range(n):
            s, pos = _string(buf, pos)
            values.append(s)
        return values, pos
    values = []
    for _ in range(n):   # arrays of arrays: rare, but walk them rather than fail
        v, pos = _value(buf, pos, elem)
        values.append(v)
    return values, pos
