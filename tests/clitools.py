"""What the CLI tests share: the repo root, the environment a `python -m ...` subprocess gets
(the repo on PYTHONPATH, one OpenMP thread, ../shared/{data,models} when they exist), and
`run_module`, the same command run inside the test process.

Why in-process: a subprocess pays a fresh interpreter, the torch import and a model load (several
seconds each on a 2-core CI machine) before it does what the test checks. `run_module` runs the
entry point's own `if __name__ == "__main__":` block (runpy), so exit status, stdout and stderr are
what `python -m` would give; tests that need a real process (signals, exit on a crash, `-c` code,
torchrun) keep subprocess.run."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
for _var, _sub in (("HARNESS_DATA", "data"), ("HARNESS_MODELS", "models")):
    if (SHARED / _sub).is_dir():
        ENV.setdefault(_var, str(SHARED / _sub))


def run_module(module: str, *args, cwd: str | os.PathLike = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` in this process: a CompletedProcess with the exit status and the text
    written to stdout and stderr (logging included). sys.argv, the environment (ENV's variables, or
    `env`), the working directory, the logging setup, torch's thread count and the SIGINT/SIGTERM
    handlers are restored afterwards. An exception that escapes the entry point is printed as Python
    would print it, with status 1 (a Ctrl-C of the test run itself still stops the run)."""
    argv, environ, old_cwd = sys.argv[:], dict(os.environ), os.getcwd()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = {name: (lg.handlers[:], lg.level, lg.propagate, lg.disabled)
               for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    out, err = io.StringIO(), io.StringIO()
    status = 0
    import torch   # every entry point imports it; one thread, as OMP_NUM_THREADS=1 gives a subprocess
    threads = torch.get_num_threads()
    signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _shield_absl_stream()
    try:
        torch.set_num_threads(int((env or ENV).get("OMP_NUM_THREADS") or threads))
        os.environ.clear()
        os.environ.update(env or ENV)
        os.chdir(cwd)
        sys.argv = [module, *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                _clear_hydra()
                with warnings.catch_warnings():   # a fresh copy of the module runs, as under `python -m`
                    warnings.filterwarnings("ignore", r".* found in sys\.modules after import of package",
                                            RuntimeWarning)
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what the interpreter would print, status 1
                traceback.print_exc()
                status = 1
            finally:
                _clear_hydra()
    finally:
        for h in root.handlers:
            if h not in handlers:
                with contextlib.suppress(Exception):
                    h.close()
        root.handlers[:], root.level = handlers, level
        for name, lg in logging.Logger.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                before = loggers.get(name, ([], logging.NOTSET, True, False))
                for h in lg.handlers:
                    if h not in before[0]:
                        with contextlib.suppress(Exception):
                            h.close()
                lg.handlers[:], lg.level, lg.propagate, lg.disabled = before
        sys.argv = argv
        torch.set_num_threads(threads)
        for s, handler in signals.items():
            signal.signal(s, handler)
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess([sys.executable, "-m", module, *map(str, args)], status,
                                       out.getvalue(), err.getvalue())


def _shield_absl_stream() -> None:
    """Hydra's logging set-up closes every live handler (logging.config.dictConfig). absl's handler
    (imported by lm-eval's metrics) then closes its stream unless it is the *current* sys.stderr,
    which inside run_module it is not: that stream is pytest's capture file, and every later test in
    the worker would fail. Pointing it at sys.__stderr__, which absl never closes, prevents that."""
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


def _clear_hydra() -> None:
    """Hydra keeps one global instance per process; each command starts without one, as it would."""
    with contextlib.suppress(ImportError):
        from hydra.core.global_hydra import GlobalHydra
        GlobalHydra.instance().clear()
