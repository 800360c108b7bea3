"""python -m harness.serve model=<registry name|checkpoint folder|.gguf> [host=127.0.0.1] [port=11434]
                         [name=<served name>] [dtype=float32|bfloat16] [num_ctx=4096]

Serves one checkpoint over the Ollama REST API and the OpenAI one, so the `ollama` client (and the LLM judge) can use
the project's own models:

    GET /, HEAD /      "Ollama is running"
    POST /api/chat     POST /api/generate     (stream: NDJSON lines, or one object with stream false)
    GET /api/tags      POST /api/show     GET /api/ps     GET /api/version
    POST /api/pull     (the served model only: nothing to download)
    /api/push, /api/create, /api/copy, /api/delete, /api/blobs/*: 501, one fixed model is served

and the OpenAI API (harness.serve.openai_routes; the `openai` SDK with base_url=http://HOST:PORT/v1):

    POST /v1/chat/completions     POST /v1/completions     POST /v1/embeddings
    GET /v1/models     GET /v1/models/{id}

The model answers to its served name (default: the registry name, or the folder / file stem) and to
"<name>:latest". Requests are parsed by `harness.serve.ollama_api` (defaults, ignored fields and the
chat template fallback are documented there), answered by `harness.serve.app` (FastAPI on uvicorn)
and generated one at a time by `harness.serve.engine`.
Once listening, one line `serving <name> on http://HOST:PORT` goes to stdout (port=0 picks a free
port); request logs go to stderr through `logging`. The API has no authentication: any host other
than a loopback address logs a warning. SIGTERM/SIGINT stop accepting, let requests in flight
finish (up to shutdown_grace_s seconds) and exit 0; a second signal exits at once.

Bad input (unknown model, missing or unreadable weights, a classifier checkpoint, a port in use)
prints one `error:` line on stderr and exits with status 2.
"""
from __future__ import annotations

import logging
import socket
import sys

import hydra
from omegaconf import DictConfig

from harness.cli import UserError, exit_after, int_option, run_cli
from harness.config import rewrite_argv
from harness.serve import is_loopback, served_name

log = logging.getLogger("harness.serve")


def start(cfg: DictConfig) -> tuple[socket.socket, object, object]:
    """Bind the socket, then load the model; bad input raises UserError. (socket, app, card)."""
    from harness.config import instantiate
    from harness.serve.app import add_ollama_routes, bind, create_app
    from harness.serve.engine import Engine, describe_model
    from harness.serve.openai_routes import add_openai_routes
    port = int_option(cfg.port, "port", minimum=0)
    if port > 65535:
        raise UserError(f"port={port}: expected 0..65535 (0 picks a free port)")
    num_ctx = int_option(cfg.num_ctx, "num_ctx", minimum=1)
    name = served_name(cfg)
    if not name or any(c.isspace() for c in name):
        raise UserError(f"served name {name!r} must be non-empty without spaces; set name=...")
    if str(cfg.model.get("_target_", "")) == "models.hf.load_hf_lm":   # the engine runs a TorchLM's decode loop
        raise UserError("harness.serve serves the harness's own models; model=hf:... (transformers) is for "
                        "python -m harness only: serve a checkpoint folder, .gguf file or registry name")
    host = str(cfg.host)
    try:
        sock = bind(host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another port= "
                        "(port=0 picks a free one)") from None
    lm = instantiate(cfg.model, "model")   # unwraps Hydra's InstantiationException
    lm.require_vocabulary_head()   # a classifier checkpoint cannot generate text
    card = describe_model(lm, str(cfg.model.name), name, num_ctx)
    app = create_app(Engine(lm, num_ctx), card, apis=(add_ollama_routes, add_openai_routes))
    if not is_loopback(host):
        log.warning("listening on %s: the API has no authentication; anyone who can reach this "
                    "address can use the model", host)
    return sock, app, card


@hydra.main(version_base="1.3", config_path="../../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=str(cfg.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def job() -> None:
        from harness.serve.app import Server, url_of
        sock, app, card = start(cfg)
        url = url_of(sock)
        server = Server(app, float(cfg.shutdown_grace_s),
                        on_ready=lambda: print(f"serving {card.name} on {url}", flush=True))
        server.run_on(sock)

    run_cli(job, interrupted="interrupted while loading the model")


if __name__ == "__main__":
    # model=<path> -> model=checkpoint model.name=<path>, exactly as the eval CLI does
    exit_after(main, rewrite_argv)
