"""Prompt templates for the Ollama routes: Go templates (/api/generate's `template`, the part of
text/template Ollama's templates need) and the model's own chat template (`ChatTemplate`). No HTTP,
no torch."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from harness.serve.ollama_fields import ApiError

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



@dataclass
class ChatTemplate:
    """Renders prompts with the tokenizer's chat template (None: the documented plain fallback).
    render(messages, tools) gets the tools only when a request has some (HF templates take
    `tools=`, a list of {"type": "function", "function": {name, description, parameters}})."""
    render: Callable[..., str] | None

    def chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        if self.render is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        try:
            return self.render(messages, tools) if tools else self.render(messages)
        except Exception as e:   # the template's own raise_exception (e.g. roles out of order)
            raise ApiError(400, f"cannot apply the chat template: {e}") from None

    def generate(self, prompt: str, system: str) -> str:
        if self.render is None:
            return f"{system}\n\n{prompt}" if system else prompt
        return self.chat(([{"role": "system", "content": system}] if system else [])
                         + [{"role": "user", "content": prompt}])
