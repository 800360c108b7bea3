"""Tool calling on /api/chat, as data: the request's `tools` and tool-related messages checked and
shaped for the chat template (which renders them: HF templates take `tools=`), and the model's output
parsed back into Ollama's `message.tool_calls`. No HTTP, no torch.

Output formats recognised (what tool-capable chat templates teach their models):
  Qwen / Hermes   <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one or more; the text
                  outside the tags stays the message content
  bare JSON       the whole reply is {"name": ..., "arguments"|"parameters": {...}} or a list of them
Anything else is plain content with no tool calls (as Ollama answers when the model does not call).
"""
from __future__ import annotations

import json
import re
from typing import Any

from harness.serve.ollama_fields import ApiError, shown, typed_field

_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tools(body: dict, model: str, supports_tools: bool) -> list[dict]:
    """The request's tools ([] when none); a 400 when the model's template cannot render them."""
    tools = typed_field(body, "tools", (list,), [])
    if not tools:
        return []
    if not supports_tools:
        raise ApiError(400, f"{model} does not support tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"tools[{i}] must be an object {{\"type\": \"function\", \"function\": "
                                f"{{\"name\": ..., \"parameters\": ...}}}}, got {shown(t)}")
    return tools


def message_extras(m: dict, where: str) -> dict:
    """The tool-related fields of one history message, checked: an assistant's `tool_calls` (each
    {"function": {"name", "arguments"}}) and a tool result's `tool_name` (also given to templates
    as `name`, the key HF templates read)."""
    out: dict[str, Any] = {}
    calls = typed_field(m, "tool_calls", (list,), [], where)
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}tool_calls[{j}] must be {{\"function\": {{\"name\": ..., \"arguments\": "
                                f"{{...}}}}}}, got {shown(c)}")
        args = fn.get("arguments", {})
        if not isinstance(args, dict):
            raise ApiError(400, f"{where}tool_calls[{j}].function.arguments must be an object, got {shown(args)}")
    if calls:
        out["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                                               "arguments": c["function"].get("arguments", {})}}
                             for c in calls]
    name = typed_field(m, "tool_name", (str,), "", where) or typed_field(m, "name", (str,), "", where)
    if name:
        out["name"] = out["tool_name"] = name
    return out


def _call(obj: Any) -> dict | None:
    """{"name", "arguments"} (or "parameters") -> Ollama's {"function": {"name", "arguments"}}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):   # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"function": {"name": obj["name"], "arguments": args}}


def _calls_in(text: str) -> list[dict] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    calls = [_call(o) for o in (obj if isinstance(obj, list) else [obj])]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """(the content left, the tool calls) of a model's reply; ([], text) when it calls none. A
    <tool_call> block that is not a valid call stays in the content, as written."""
    tagged = list(_TAGGED.finditer(text))
    if tagged:
        calls, content, pos = [], [], 0
        for m in tagged:
            found = _calls_in(m.group(1))
            if found is None:
                continue
            content.append(text[pos:m.start()])
            pos = m.end()
            calls += found
        if calls:
            content.append(text[pos:])
            return "".join(content).strip(), calls
        return text, []
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        found = _calls_in(stripped)
        if found:
            return "", found
    return text, []
