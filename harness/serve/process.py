"""`python -m harness.serve` as a child process: start it, wait until it listens, stop it.

    server = spawn_server(["model=smollm2-135m-instruct", "host=127.0.0.1", "port=0"])
    ollama.Client(host=server.url).chat(model=server.model, ...)
    server.stop()

The server prints one line `serving <name> on <url>` to stdout once it listens (harness/serve/__main__.py);
this reads that line and keeps draining stdout afterwards, so the child never blocks on a full pipe.
Used by the baseline ladder (its local judge), the test fixture and bench/serve_speed.py.
"""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

READY = re.compile(r"serving (\S+) on (\S+)")


class ServerStartError(RuntimeError):
    """The server exited or stayed silent before listening; the message says which."""


@dataclass
class ServedProcess:
    process: subprocess.Popen
    url: str        # http://HOST:PORT
    model: str      # the served name

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (requests in flight finish), then SIGKILL after `timeout` seconds."""
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def spawn_server(args: Sequence[str], *, env: dict | None = None, cwd: str | Path | None = None,
                 stderr: IO | None = None, timeout: float = 300) -> ServedProcess:
    """Start `python -m harness.serve <args>` (pass port=0 for a free port) and wait for it to listen."""
    proc = subprocess.Popen([sys.executable, "-m", "harness.serve", *args], cwd=cwd, env=env or dict(os.environ),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue = queue.Queue()

    def drain() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=timeout)
            if line is None:
                raise ServerStartError(f"harness.serve exited with status {proc.wait()} before listening")
            ready = READY.match(line)
            if ready:
                return ServedProcess(proc, url=ready.group(2), model=ready.group(1))
    except queue.Empty:
        proc.kill()
        proc.wait()
        raise ServerStartError(f"harness.serve did not start listening within {timeout:.0f} s") from None
