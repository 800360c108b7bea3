"""Where data and model files live, and fetching them from their canonical source with a sha256 check.

`HARNESS_DATA` (default ~/.cache/harness/data) and `HARNESS_MODELS` (default ~/.cache/harness/models)
are laid out like `../shared/data` and `../shared/models`. A missing file is downloaded once; when
that fails (no network, moved URL) the error says which folder to fill and how.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from harness.cli import UserError


class MissingFileError(UserError):
    """A data or model file is absent and could not be fetched. The message is user-facing."""


def data_root() -> Path:
    return Path(os.environ.get("HARNESS_DATA") or Path.home() / ".cache/harness/data").expanduser()


def models_root() -> Path:
    return Path(os.environ.get("HARNESS_MODELS") or Path.home() / ".cache/harness/models").expanduser()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically (temp file + rename), verifying sha256 when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, length=1 << 20)
        if sha256 is not None:
            got = sha256_file(tmp)
            if got != sha256:
                raise UserError(f"sha256 mismatch for {url}: expected {sha256}, got {got}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def ensure_file(path: Path, url: str | None, sha256: str | None, what: str, env_var: str) -> Path:
    """Return `path`, downloading it from `url` first if it is missing.

    Raises MissingFileError naming the folder to fill (and the download's own error) on failure.
    """
    if path.exists():
        return path
    if url is None:
        raise MissingFileError(f"{what} not found at {path}; put the file there (or set {env_var})")
    try:
        return download(url, path, sha256)
    except Exception as e:  # network errors come in many types; all mean the same thing to a user
        raise MissingFileError(
            f"{what} not found at {path} and downloading {url} failed ({type(e).__name__}: {e}); "
            f"download it by hand into {path.parent} or point {env_var} at a folder that has it"
        ) from None
