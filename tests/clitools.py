"""What the CLI tests share: the repo root and the environment a `python -m ...` subprocess gets
(the repo on PYTHONPATH, one OpenMP thread, ../shared/{data,models} when they exist)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
for _var, _sub in (("HARNESS_DATA", "data"), ("HARNESS_MODELS", "models")):
    if (SHARED / _sub).is_dir():
        ENV.setdefault(_var, str(SHARED / _sub))
