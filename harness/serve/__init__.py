"""harness.serve: one checkpoint served over the Ollama REST API (`python -m harness.serve`, see
__main__.py). The parts:

    ollama_api.py   request bodies -> Jobs, the model's metadata, the answers (no HTTP, no torch)
    app.py          the FastAPI app and its uvicorn server: thin routes, streaming, disconnects
    engine.py       the one loaded model, generation serialized by a lock (torch)
    process.py      `python -m harness.serve` as a child process (tests, the judge, benchmarks)

Importing the package loads none of them (nor torch); the two helpers below serve the CLI.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name: only "localhost" is known to stay on this machine
        return False


def served_name(cfg) -> str:
    """The name the model answers to: name=..., else the registry name, or the folder / file stem."""
    from models.registry import MODELS
    if cfg.name:
        return str(cfg.name)
    source = str(cfg.model.name)
    path = Path(source).expanduser()
    return source if source in MODELS else path.stem if path.is_file() else path.name
