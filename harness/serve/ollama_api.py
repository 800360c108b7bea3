"""The Ollama REST API as data: request bodies -> validated `Job`s, the served model's metadata
(`ModelCard`: /api/tags, /api/show, /api/ps), the model-management answers (/api/pull and the 501s)
and the response objects. No HTTP and no torch here: `harness.serve.app` does the I/O and
`harness.serve.engine` the generation.

What a request may carry (everything else is accepted and ignored, as Ollama does):
  /api/chat      model, messages [{role, content, images}], stream (default true), options,
                 tools: a non-empty list is a 400 "<model> does not support tools" when the chat
                 template has no tool support, and a 400 too when it has (tools are not rendered yet)
  /api/generate  model, prompt, system, raw, stream, options,
                 context: token ids of an earlier exchange, decoded and put before the prompt (as
                 Ollama does); the final chunk of a templated (not raw) request carries `context`,
                 the ids of prompt + response, to send back with the next prompt
                 template: a Go template in place of the model's (render_go_template: .System,
                 .Prompt, .Response, if/else/end, comments; anything else is a 400); the model's
                 own template text means the default; suffix: non-empty is a 400 (no fill-in-the-middle)
  both           keep_alive: a number of seconds or a Go duration ("5m", "0"); with nothing to
                 generate, 0 answers done_reason "unload" (the one model stays loaded all the same);
                 format, think: accepted and ignored; non-empty images: 400
  options        temperature 0.8, top_k 40, top_p 0.9, seed (random when absent or < 0),
                 num_predict -1 (until EOS or the context is full), stop [], num_ctx
Numbers must be finite; seed, top_k, num_predict and num_ctx (>= 1) are integers within Go's int64,
as in Ollama (an integral float such as 4.0 counts). Type and range errors are 400s naming the field:
"options.num_predict must be an integer, got 3.5".
Chat prompts come from the tokenizer's chat template; a model without one gets plain lines
"role: content" and a final "assistant:" to continue from. /api/generate without `raw` wraps the
prompt (and `system`) in the chat template as one user turn; without a template it is sent as is,
after the system text when one is given.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P = 0.8, 40, 0.9   # Ollama's defaults
GREEDY_BELOW = 1e-5   # a smaller temperature is greedy decoding (vLLM's threshold)


class ApiError(Exception):
    """An error answered as {"error": message} with an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Abandoned(Exception):
    """A generation given up because its client went away; it stopped after `tokens` tokens."""

    def __init__(self, tokens: int):
        super().__init__(f"abandoned after {tokens} generated tokens")
        self.tokens = tokens


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class Sampling:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None
    num_predict: int = -1          # < 0: until EOS or the context is full
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None     # None: the server's default


@dataclass(frozen=True)
class Job:
    endpoint: str                  # "chat" | "generate"
    model: str                     # as the client spelled it (echoed back, like Ollama)
    prompt: str | tuple[int, ...] | None   # the text (or token ids) the model continues; None: "load"
    stream: bool
    sampling: Sampling = field(default_factory=Sampling)
    context: tuple[int, ...] = ()  # /api/generate: token ids of an earlier exchange, before the prompt
    want_context: bool = False     # /api/generate without raw: the final chunk carries `context`
    unload: bool = False           # keep_alive 0: a request with nothing to generate answers "unload"
    schema: dict | None = None     # the output must be JSON matching this schema (format / response_format)
    logprobs: int | None = None    # record each generated token's log-prob and this many alternatives


def parse_json(raw: bytes) -> dict:
    if not raw.strip():
        raise ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
        if _SURROGATE_ESCAPE.search(raw):
            body = _no_lone_surrogates(body)
    except (UnicodeDecodeError, ValueError) as e:   # ValueError: also an integer over 4300 digits
        raise ApiError(400, f"invalid JSON body: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(body)}")
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_lone_surrogates(v: Any) -> Any:
    """An unpaired surrogate escape ("\\ud800") becomes U+FFFD, as Go's JSON decoder (Ollama's) makes
    it; Python keeps it, and the tokenizer then fails on a str that is not valid Unicode."""
    if isinstance(v, str):
        return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(v, list):
        return [_no_lone_surrogates(x) for x in v]
    if isinstance(v, dict):
        return {_no_lone_surrogates(k): _no_lone_surrogates(x) for k, x in v.items()}
    return v


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1   # Go's int: what Ollama's integer options are
_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
          dict: "an object"}


def _json_type(v: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if v is None else names.get(type(v), type(v).__name__)


def _shown(v: Any) -> str:
    """A bad value in a message: numbers and booleans as written in JSON (cut when long), short
    strings quoted, anything else by its JSON type."""
    if isinstance(v, (bool, int, float)):
        text = json.dumps(v)
        return text if len(text) <= 24 else f"{text[:20]}... ({len(text.lstrip('-'))} digits)"
    if isinstance(v, str) and len(v) <= 24:
        return f"string {json.dumps(v)}"
    return _json_type(v)


def _typed(v: Any, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """v checked against JSON kinds (None = absent: default; bools are not numbers); a 400 naming
    the field otherwise."""
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        want = " or ".join(dict.fromkeys(_KINDS[k] for k in kinds if not (k is int and float in kinds)))
        raise ApiError(400, f"{name} must be {want}, got {_shown(v)}")
    return v


def _get(obj: dict, key: str, kinds: tuple[type, ...], default: Any = None, where: str = "") -> Any:
    return _typed(obj.get(key), where + key, kinds, default)


def _int(obj: dict, key: str, default: int | None, where: str = "options.", low: int = INT64_MIN,
         high: int = INT64_MAX) -> int | None:
    """An integer field. JSON has one number type, so 4.0 counts as 4 (Ollama takes it too); 4.5, true
    and values outside [low, high] are 400s. The default range is Go's int64, the type Ollama decodes
    these into (past 2**64 a seed overflowed torch's generator, a 500)."""
    v = obj.get(key)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    v = _typed(v, where + key, (int,), default)
    if v is not None and not low <= v <= high:
        raise ApiError(400, f"{where}{key} must be an integer between {low} and {high}, got {_shown(v)}")
    return v


def _float(obj: dict, key: str, default: float, where: str = "options.") -> float:
    """A finite number field (an integer too large for a float is not one)."""
    v = _get(obj, key, (int, float), default, where)
    try:
        f = float(v)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f):
        raise ApiError(400, f"{where}{key} must be a finite number, got {_shown(v)}")
    return f


def parse_sampling(options: Any) -> Sampling:
    if options is None:
        return Sampling()
    if not isinstance(options, dict):
        raise ApiError(400, f"options must be an object, got {_shown(options)}")
    temperature = _float(options, "temperature", DEFAULT_TEMPERATURE)
    top_p = _float(options, "top_p", DEFAULT_TOP_P)
    seed = _int(options, "seed", None)   # negative: a random seed, as in Ollama
    num_ctx = _int(options, "num_ctx", None, low=1)
    stop = _get(options, "stop", (list, str), [], "options.")
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "options.stop must be a string or an array of strings")
    if temperature < 0:
        raise ApiError(400, f"options.temperature must be a number >= 0, got {_shown(options['temperature'])}")
    if top_p <= 0 or temperature < GREEDY_BELOW:   # top_p 0 keeps only the most likely token (llama.cpp);
        temperature = 0.0                           # dividing logits by a tiny temperature overflows
    return Sampling(temperature=temperature, top_k=_int(options, "top_k", DEFAULT_TOP_K), top_p=top_p,
                    seed=seed if seed is None or seed >= 0 else None,
                    num_predict=_int(options, "num_predict", -1), stop=tuple(s for s in stop if s),
                    num_ctx=num_ctx)


_DURATION = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_UNIT_NS = {"ns": 1, "us": 1e3, "µs": 1e3, "μs": 1e3, "ms": 1e6, "s": 1e9, "m": 60e9, "h": 3600e9}


def parse_keep_alive(v: Any) -> float | None:
    """keep_alive in seconds (None: absent; negative: forever), read as Ollama reads it: a JSON number
    is seconds, a string is a Go duration ("5m", "1h30m", "0")."""
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _float({"keep_alive": v}, "keep_alive", 0.0, where="")
    if not isinstance(v, str):
        raise ApiError(400, f"keep_alive must be a number of seconds or a duration string, got {_shown(v)}")
    if v in ("0", "+0", "-0"):
        return 0.0
    if not _DURATION.fullmatch(v):
        raise ApiError(400, f'keep_alive: invalid duration {json.dumps(v)} (expected e.g. "5m", "30s", "0")')
    ns = sum(float(n) * _UNIT_NS[u] for n, u in re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)", v))
    return -ns / 1e9 if v.startswith("-") else ns / 1e9


def _common(body: dict, card: ModelCard) -> tuple[str, bool, Sampling, bool]:
    """(model as spelled, stream, sampling, keep_alive is 0)."""
    model = _get(body, "model", (str,), "")
    if not model:
        raise ApiError(400, "model is required")
    if not card.matches(model):
        raise ApiError(404, f"model '{model}' not found")
    # format and think are accepted and ignored: text only; keep_alive 0 only changes the empty
    # request's answer, the one model stays loaded
    unload = parse_keep_alive(body.get("keep_alive")) == 0
    return model, _get(body, "stream", (bool,), True), parse_sampling(body.get("options")), unload


def _reject_images(images: Any, model: str, where: str = "") -> None:
    if images is not None and not isinstance(images, list):
        raise ApiError(400, f"{where}images must be an array, got {_shown(images)}")
    if images:
        raise ApiError(400, f"model '{model}' does not support images (it has no vision input); "
                            "send text only")


_GO_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_GO_FIELD = re.compile(r"\.([A-Za-z_]\w*)")


def render_go_template(source: str, values: dict[str, str]) -> str:
    """The part of Go's text/template that Ollama's prompt templates for /api/generate need:
    {{ .Field }}, {{ if .Field }}...{{ else }}...{{ end }} (nested too), {{/* comments */}} and the
    {{- -}} whitespace trims. Anything else (range, functions, pipelines) is a 400 naming it."""
    def unsupported(action: str) -> ApiError:
        return ApiError(400, f"template: {{{{ {action} }}}} is not supported by harness.serve (only "
                             f"{', '.join('.' + k for k in values)}, if/else/end and comments); send raw: true "
                             "with a prompt formatted as you need")

    root: list = []
    stack = [(root, None)]   # (the list being filled, the if-node it belongs to)
    pos, trim_next = 0, False
    for m in _GO_ACTION.finditer(source):
        text = source[pos:m.start()]
        text = text.lstrip() if trim_next else text
        stack[-1][0].append(text.rstrip() if m.group(1) else text)
        pos, trim_next, action = m.end(), bool(m.group(3)), m.group(2)
        field_ = _GO_FIELD.fullmatch(action)
        if action.startswith("/*") and action.endswith("*/"):
            continue
        if field_ and field_.group(1) in values:
            stack[-1][0].append(("field", field_.group(1)))
        elif action.startswith("if ") and (cond := _GO_FIELD.fullmatch(action[3:].strip())) and cond.group(1) in values:
            node = ("if", cond.group(1), [], [])
            stack[-1][0].append(node)
            stack.append((node[2], node))
        elif action == "else" and stack[-1][1] is not None and stack[-1][0] is stack[-1][1][2]:
            stack[-1] = (stack[-1][1][3], stack[-1][1])
        elif action == "end" and len(stack) > 1:
            stack.pop()
        else:
            raise unsupported(action)
    if len(stack) > 1:
        raise ApiError(400, "template: an {{ if }} has no {{ end }}")
    tail = source[pos:]
    root.append(tail.lstrip() if trim_next else tail)

    def render(nodes: list) -> str:
        out = []
        for n in nodes:
            if isinstance(n, str):
                out.append(n)
            elif n[0] == "field":
                out.append(values[n[1]])
            else:
                out.append(render(n[2] if values[n[1]] else n[3]))
        return "".join(out)
    return render(root)


def _context(v: Any) -> tuple[int, ...]:
    v = _typed(v, "context", (list,), [])
    for i, t in enumerate(v):
        if isinstance(t, float) and t.is_integer():
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ApiError(400, f"context[{i}] must be a token id (an integer >= 0), got {_shown(v[i])}")
    return tuple(int(t) for t in v)


def parse_generate(body: dict, card: ModelCard, template: ChatTemplate) -> Job:
    model, stream, sampling, unload = _common(body, card)
    prompt = _get(body, "prompt", (str,), "")
    system = _get(body, "system", (str,), "")
    raw = _get(body, "raw", (bool,), False)
    if _get(body, "suffix", (str,), ""):
        raise ApiError(400, f"{model} does not support insert (suffix): harness.serve has no "
                            "fill-in-the-middle; send the text before the gap as the prompt")
    custom = _get(body, "template", (str,), "")
    if custom.strip() == card.template.strip():
        custom = ""   # the model's own: the default path
    context = _context(body.get("context"))
    _reject_images(body.get("images"), model)
    if custom and not raw:   # checked even for an empty prompt, as a bad field always is
        rendered = render_go_template(custom, {"System": system, "Prompt": prompt, "Response": ""})
    if not prompt:
        return Job("generate", model, None, stream, sampling, unload=unload)
    if not raw:
        prompt = rendered if custom else template.generate(prompt, system)
    return Job("generate", model, prompt, stream, sampling, context=context, want_context=not raw)


def parse_chat(body: dict, card: ModelCard, template: ChatTemplate) -> Job:
    model, stream, sampling, unload = _common(body, card)
    tools = _get(body, "tools", (list,), [])
    if tools:
        if not card.supports_tools:
            raise ApiError(400, f"{model} does not support tools")
        raise ApiError(400, f"{model}: harness.serve does not render tools into the chat template yet; "
                            "send the request without tools")
    messages = _get(body, "messages", (list,), [])
    clean = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object, got {_shown(m)}")
        role = _get(m, "role", (str,), "", where)
        if not role:
            raise ApiError(400, f"{where}role is required: system, user, assistant or tool")
        _reject_images(m.get("images"), model, where)
        clean.append({"role": role, "content": _get(m, "content", (str,), "", where)})
    if not clean:
        return Job("chat", model, None, stream, sampling, unload=unload)
    return Job("chat", model, template.chat(clean), stream, sampling)


@dataclass
class ChatTemplate:
    """Renders prompts with the tokenizer's chat template (None: the documented plain fallback)."""
    render: Callable[[list[dict]], str] | None

    def chat(self, messages: list[dict]) -> str:
        if self.render is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        try:
            return self.render(messages)
        except Exception as e:   # the template's own raise_exception (e.g. roles out of order)
            raise ApiError(400, f"cannot apply the chat template: {e}") from None

    def generate(self, prompt: str, system: str) -> str:
        if self.render is None:
            return f"{system}\n\n{prompt}" if system else prompt
        return self.chat(([{"role": "system", "content": system}] if system else [])
                         + [{"role": "user", "content": prompt}])


# ----------------------------------------------------------------------------- the served model

@dataclass
class ModelCard:
    """What the API says about the one served model (built by harness.serve.engine.describe_model)."""
    name: str                      # "x" is served as "x:latest" and answers to both
    digest: str                    # sha256 hex of the weights file(s): stable per weights
    size: int                      # bytes of the weights on disk
    modified_at: str
    details: dict
    model_info: dict
    template: str
    parameters: str
    context_length: int
    size_vram: int = 0
    expires_at: str = field(default_factory=lambda: (datetime.now(timezone.utc) + timedelta(days=36500))
                            .isoformat().replace("+00:00", "Z"))   # never unloaded

    @property
    def supports_tools(self) -> bool:
        """Ollama's test: the chat template mentions tools."""
        return "tools" in self.template

    @property
    def tag(self) -> str:
        return self.name if ":" in self.name else f"{self.name}:latest"

    def matches(self, requested: str) -> bool:
        """Ollama's naming: "x" means "x:latest"; case does not matter."""
        requested = requested if ":" in requested else f"{requested}:latest"
        return requested.lower() == self.tag.lower()

    def tags(self) -> dict:
        return {"models": [{"name": self.tag, "model": self.tag, "modified_at": self.modified_at,
                            "size": self.size, "digest": self.digest, "details": self.details}]}

    def show(self) -> dict:
        source = self.model_info.get("harness.source", self.name)
        return {"modelfile": f"# served by harness.serve\nFROM {source}\n",
                "parameters": self.parameters, "template": self.template, "details": self.details,
                "model_info": self.model_info, "modified_at": self.modified_at,
                "capabilities": ["completion"] + (["tools"] if self.supports_tools else [])}

    def ps(self) -> dict:
        return {"models": [{"name": self.tag, "model": self.tag, "size": self.size, "digest": self.digest,
                            "details": self.details, "expires_at": self.expires_at,
                            "size_vram": self.size_vram, "context_length": self.context_length}]}


# ----------------------------------------------------------------------------- responses

@dataclass
class Outcome:
    """One finished generation; durations in nanoseconds, as Ollama reports them."""
    text: str
    done_reason: str               # "stop" (EOS or a stop string) | "length"
    prompt_eval_count: int
    eval_count: int
    load_duration: int             # waiting for the model (other requests hold it)
    prompt_eval_duration: int      # prefill and the first token
    eval_duration: int             # every later token
    total_duration: int = 0
    context: list[int] | None = None   # token ids of prompt + response (Job.want_context)
    tokens: list[int] = field(default_factory=list)   # the generated ids (EOS excluded)
    scores: list | None = None     # Job.logprobs: a TokenScore (harness.serve.openai_responses) per generated token


def chunk(job: Job, text: str, done: bool = False) -> dict:
    out = {"model": job.model, "created_at": now_rfc3339()}
    if job.endpoint == "chat":
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["response"] = text
    out["done"] = done
    return out


def final(job: Job, outcome: Outcome, text: str) -> dict:
    """The last stream line (text "") or the whole non-streamed answer (text = all of it)."""
    return {**chunk(job, text, done=True), "done_reason": outcome.done_reason,
            "total_duration": outcome.total_duration, "load_duration": outcome.load_duration,
            "prompt_eval_count": outcome.prompt_eval_count,
            "prompt_eval_duration": outcome.prompt_eval_duration,
            "eval_count": outcome.eval_count, "eval_duration": outcome.eval_duration,
            **({"context": outcome.context} if outcome.context is not None else {})}


def loaded(job: Job) -> dict:
    """Ollama's answer to a request with nothing to generate: the model is (already) loaded, or with
    keep_alive 0 "unload" (harness.serve keeps its one model all the same)."""
    return {**chunk(job, "", done=True), "done_reason": "unload" if job.unload else "load"}


# ----------------------------------------------------------------------------- model management

def parse_pull(body: dict, card: ModelCard) -> tuple[str, bool]:
    """(the name, stream) of a pull of the served model; any other name is a 404."""
    model = body.get("model") or body.get("name")   # older clients send "name"
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required (a string)")
    if not card.matches(model):
        raise ApiError(404, f"model '{model}' not found: harness.serve serves only '{card.tag}' "
                            "and cannot pull other models")
    return model, _get(body, "stream", (bool,), True)


def pull_progress(card: ModelCard) -> list[dict]:
    """Ollama's pull status lines for a model that is already here: nothing to download."""
    return [{"status": "pulling manifest"},
            {"status": f"pulling {card.digest[:12]}", "digest": f"sha256:{card.digest}",
             "total": card.size, "completed": card.size},
            {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]


UNSUPPORTED = {"/api/push": "push", "/api/create": "create", "/api/copy": "copy", "/api/delete": "delete",
               "/api/blobs": "blob upload"}


def not_supported(path: str, card: ModelCard) -> ApiError:
    """501 for Ollama's model management: harness.serve serves one fixed model."""
    what = next((w for p, w in UNSUPPORTED.items() if path == p or path.startswith(p + "/")), path)
    return ApiError(501, f"{path}: model {what} is not supported; harness.serve serves one fixed model "
                         f"('{card.tag}') and manages no others")
