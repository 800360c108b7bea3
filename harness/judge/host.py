"""The judge's address, checked before anything is loaded and told apart from servers that are not
Ollama; and JudgeConfigError, the one error type of every judge configuration problem.

    check_host("http://127.0.0.1:11434")   # fine; "notaurl::::", "", "ftp://x", ":99999" raise JudgeConfigError
    not_ollama(http_client, host, timeout)  # None for Ollama / harness.serve, else the one-line reason

`judge.host` is read the way the `ollama` client reads OLLAMA_HOST: scheme (http, https) and port
are optional (`127.0.0.1:11434`, `gpu-box`, `:11434`), and a path prefix is kept for reverse proxies. The
client itself turns "" into its default (or $OLLAMA_HOST) and "ftp://x" into ftp://x:11434, so
those are refused here rather than becoming a confusing connection error minutes later.
"""
from __future__ import annotations

import re
import urllib.parse
from typing import Any

from harness.cli import UserError

EXAMPLE = "http://127.0.0.1:11434"


class JudgeConfigError(UserError):
    """The judge cannot work as configured; the run stops with one `error:` line."""


def bad_host(host: Any, why: str, key: str = "judge.host"):
    """The one-line JudgeConfigError (a UserError) for an unusable server address in config `key`."""
    noun = "judge" if key.startswith("judge") else "server"
    return JudgeConfigError(f"{key}={host!r} is not a {noun} address: {why}; a valid value looks like "
                            f"{EXAMPLE} (scheme http or https, host, port 1-65535)")


def check_host(host: Any, key: str = "judge.host") -> None:
    """Raise JudgeConfigError (one line naming `key`) unless `host` is a usable server address; also
    model.host of `model=ollama:<name>` (models/ollama_lm.py)."""
    text = "" if host is None else str(host)
    if not text.strip():
        raise bad_host(host, key=key, why="it is empty")
    if any(c.isspace() for c in text):
        raise bad_host(host, key=key, why="it contains whitespace")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme.lower() not in ("http", "https"):
        raise bad_host(host, key=key, why=f"the scheme is {scheme!r}, and Ollama speaks http or https")
    try:
        split = urllib.parse.urlsplit(f"{scheme}://{rest}")
    except ValueError as e:                              # "Invalid IPv6 URL"
        raise bad_host(host, key=key, why=f"it does not parse as a URL ({e})") from None
    try:
        port = split.port                                # parsed lazily
    except ValueError:
        raise bad_host(host, key=key, why="the part after the host name is not a port number from 1 to 65535") from None
    if port == 0:
        raise bad_host(host, key=key, why="port 0 is not a port a server listens on")
    if not split.hostname and port is None:              # ":11434" is the client's 127.0.0.1:11434
        raise bad_host(host, key=key, why="there is neither a host name nor a port")
    if split.query or split.fragment:
        raise bad_host(host, key=key, why="a server address has no ?query or #fragment")


def excerpt(text: str, limit: int = 120) -> str:
    """The start of a reply body on one line; HTML tags dropped so an error page reads as its text."""
    if "<" in text and ">" in text:
        text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def not_ollama(http_client, host: str, timeout: float) -> str | None:
    """Why the server at `host` is not an Ollama server, or None when it is (or gave no answer).

    Ollama and harness.serve answer GET /api/version with {"version": "..."}; a plain web server
    (`python -m http.server`, a proxy's error page) answers something else. `http_client` is the
    ollama client's httpx.Client, so the probe goes where the judge's requests go."""
    import httpx

    try:
        r = http_client.get("/api/version", timeout=min(timeout, 10.0))
    except httpx.HTTPError:
        return None                                      # no answer: cannot tell, say nothing new
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code == 200 and isinstance(body, dict) and isinstance(body.get("version"), str):
        return None
    return (f"the server at judge.host={host} does not speak the Ollama API: GET /api/version answered "
            f"HTTP {r.status_code} {excerpt(r.text)!r} instead of {{\"version\": ...}}; set judge.host to "
            f"an Ollama server (`ollama serve` listens on {EXAMPLE})")

