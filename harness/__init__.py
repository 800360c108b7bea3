"""harness: an evaluation-centric benchmark harness for language models built from scratch."""
from __future__ import annotations

import re
from pathlib import Path

_BASE = "0.1.0"


def _git_short_sha() -> str | None:
    """The checkout's HEAD commit, read straight from .git (no subprocess); None when unknown."""
    try:
        git = Path(__file__).resolve().parent.parent / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (git.parent / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        sha = head
        if head.startswith("ref:"):
            ref = head[4:].strip()
            sha = ""
            for base in (git, common):
                if (base / ref).is_file():
                    sha = (base / ref).read_text().strip()
                    break
            else:
                packed = common / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            sha = line.split()[0]
                            break
        return sha[:7] if re.fullmatch(r"[0-9a-f]{40}", sha) else None
    except (OSError, IndexError, ValueError):
        return None


_sha = _git_short_sha()
__version__ = f"{_BASE}+{_sha}" if _sha else _BASE
