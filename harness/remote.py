"""What every client of a model server needs (the judge, `model=ollama:` and `model=openai:`):
bounded retries, an on-disk response cache, and a bounded pool of requests in flight.

    retry = Retrier(retries=3, backoff_s=1.0)
    body = retry.call(lambda: client.chat(...))          # Exhausted(reason) after 4 failed attempts
    cache = ResponseCache(cache_root() / "api")
    key = request_key("/api/chat", body, server_digest)   # same request to the same weights: same key
    out = map_ordered(send, items, concurrency=4)          # results in the order of items

Which failures are worth another attempt (`transient`): connection errors, timeouts, a body that
is not the API's JSON, and HTTP 408, 429 and 5xx, except 501 ("not implemented" does not change on
a retry). Any other 4xx is the request's or the configuration's fault: it is raised at once, as the
client library raised it, for the caller to turn into one line. Both clients' errors are read the
same way: `ollama.ResponseError` and `openai.APIStatusError` carry `status_code`.

The cache holds one JSON file per key (root/<2 hex>/<key>.json), written atomically with fsync
(harness.io.write_atomic), so a killed run never leaves a torn entry and a rerun of the same
requests asks the server nothing. Callers cache only answers that would come back the same
(greedy or seeded requests) and never failures.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from harness.io import write_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")


class Exhausted(Exception):
    """A request failed `attempts` times with transient errors."""

    def __init__(self, message: str, answered: bool):
        super().__init__(message)
        self.answered = answered     # the server sent something back (5xx, a body not in the API's shape)


def status_of(error: BaseException) -> int | None:
    """The HTTP status of an ollama / openai client error (None: no answer came)."""
    status = getattr(error, "status_code", None)
    return status if isinstance(status, int) else None


def retryable_status(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status != 501)


def transient(error: BaseException) -> tuple[str, bool] | None:
    """(reason, answered) when `error` is worth another attempt, None when it is final."""
    import httpx

    status = status_of(error)
    if status is not None:
        return (f"HTTP {status}", True) if retryable_status(status) else None
    timeouts: tuple = (httpx.TimeoutException,)
    connection: tuple = (ConnectionError, httpx.TransportError)
    openai = sys.modules.get("openai")     # an openai error means it is loaded; importing it costs seconds
    if openai is not None:
        timeouts, connection = (*timeouts, openai.APITimeoutError), (*connection, openai.APIConnectionError)
    if isinstance(error, timeouts):
        return "timeout", False
    if isinstance(error, connection):
        cause = error.__cause__ if error.__cause__ is not None else error
        return f"connection error ({type(cause).__name__})", False
    if isinstance(error, ValueError):                    # json / pydantic: not the API's body
        return f"malformed response ({type(error).__name__})", True
    return None


class Retrier:
    """Calls a request function until it succeeds, at most retries + 1 times, waiting backoff_s,
    2x, 4x ... between attempts. A final error is raised as it came; transient ones that use up
    the attempts become `Exhausted`."""

    def __init__(self, retries: int = 3, backoff_s: float = 1.0):
        self.retries, self.backoff_s = int(retries), float(backoff_s)

    def call(self, fn: Callable[[], T], attempts: int | None = None, what: str = "request") -> T:
        attempts = self.retries + 1 if attempts is None else attempts
        reason, answered = "no attempt", False
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return fn()
            except Exception as e:
                why = transient(e)
                if why is None:
                    raise
                reason, answered = why[0], answered or why[1]
            log.debug("%s failed (%s), attempt %d of %d", what, reason, attempt + 1, attempts)
        raise Exhausted(f"{reason} after {attempts} attempt{'s' if attempts > 1 else ''}", answered)


def served_id(list_ids: Callable[[], list[str]], retry: Retrier, model: str, what: str) -> tuple[str | None, list[str]]:
    """(the id an OpenAI-compatible server lists `model` under, every id it lists), matched without
    case and with or without ":latest"; None when it is not listed. A server without /v1/models
    (404, 405, 501) gives (model, []): the name is taken as given. Exhausted and final HTTP errors
    are raised for the caller to word (the judge and model=openai: name different config keys)."""
    try:
        ids = retry.call(list_ids, what=what)
    except Exception as e:
        if status_of(e) in (404, 405, 501):
            return model, []
        raise
    for wanted in (model, f"{model}:latest"):
        if found := [i for i in ids if i.lower() == wanted.lower()]:
            return found[0], ids
    return None, ids


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def request_key(endpoint: str, body: Any, digest: str) -> str:
    """The cache key of one request: what was asked (endpoint and body) of which weights (digest)."""
    return sha256_json({"endpoint": endpoint, "body": body, "digest": digest})


class ResponseCache:
    """One small JSON file per key under root/<2 hex>/<key>.json; readers never see a torn file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            value = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None                              # absent (or unreadable: ask again)
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict) -> None:
        write_atomic(self._path(key), json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8"))

    def put_quietly(self, key: str, value: dict) -> None:
        """put, but a full or read-only disk costs speed on the next run, never this run's results."""
        try:
            self.put(key, value)
        except OSError as e:
            log.warning("response cache %s not written: %s", self.root, e)


def map_ordered(fn: Callable[[Any], T], items: Sequence, concurrency: int = 1, desc: str = "",
                progress: bool = False) -> list[T]:
    """[fn(item) for item in items] with `concurrency` calls in flight; the first exception stops
    the rest (queued calls are cancelled) and is raised."""
    from tqdm.auto import tqdm

    items = list(items)
    if concurrency <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, disable=not progress, leave=False)]
    out: list = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    with bar, ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for f in as_completed(futures):
                out[futures[f]] = f.result()
                bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return out
