"""Prompts as turns, shown as plain text or through the model's chat template (lm-eval's
--apply_chat_template and --fewshot_as_multiturn), for every task that builds its prompt from
a description, few-shot examples and a question (multiple choice, MMLU, the suite, generative).

A prompt is a list of `Turn`s, lm-eval 0.4.13's `Message`s: the description as a system turn, each
shot as a user turn (its text, then the target delimiter) and an assistant turn (its answer, then
the few-shot delimiter), the question as a last user turn. Joined with their delimiters they are
the plain-text prompt; with a chat format they become messages for `LM.chat_prompt`:
  multiturn   one user/assistant pair per shot, then the question as its own user turn
  single      the shots and the question joined as plain text into ONE user turn
The description stays a system turn either way; a template that refuses a system role gets the
messages without it (lm-eval's fallback), and the record says so.

The task builds the messages (model-independent, so samples and their ids do not depend on the
model); `render_prompts` turns them into text with the model being scored, just before scoring.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.cli import UserError, bool_option
from models.protocol import LM
from tasks.base import Sample, TaskError


@dataclass(frozen=True)
class Turn:
    role: str           # system | user | assistant
    content: str
    delimiter: str = ""  # what follows the turn in plain text (target or few-shot delimiter)


def qa_turns(description: str, shots: Sequence[tuple[str, str]], question: str,
             target_delimiter: str = " ", fewshot_delimiter: str = "\n\n") -> list[Turn]:
    """lm-eval's fewshot_context as turns. A shot with an empty answer is a user turn alone
    (build_qa_turn: no answer, no delimiters)."""
    turns = [Turn("system", description)] if description else []
    for text, answer in shots:
        if answer:
            turns += [Turn("user", text, target_delimiter), Turn("assistant", answer, fewshot_delimiter)]
        else:
            turns.append(Turn("user", text))
    return turns + [Turn("user", question)]


def as_text(turns: Sequence[Turn]) -> str:
    return "".join(t.content + t.delimiter for t in turns)


@dataclass(frozen=True)
class ChatFormat:
    """How a task shows its prompts: plain text, or the model's chat template (`multiturn`: shots as
    separate turns). lm-eval 0.4.13 turns multiturn on whenever the chat template is applied, unless
    told otherwise; so does `fewshot_as_multiturn: null` here."""
    apply: bool = False
    multiturn: bool = False

    @classmethod
    def from_options(cls, apply_chat_template, fewshot_as_multiturn=None, scope: str = "task.") -> ChatFormat:
        """`scope`: where the options were set, for the error line (`task.` for a task, "" for
        harness.suite's own options)."""
        apply = bool_option(apply_chat_template, f"{scope}apply_chat_template")
        if fewshot_as_multiturn is None:
            return cls(apply, apply)
        multiturn = bool_option(fewshot_as_multiturn, f"{scope}fewshot_as_multiturn")
        if multiturn and not apply:
            raise TaskError(f"{scope}fewshot_as_multiturn=true needs {scope}apply_chat_template=true "
                            "(few-shot turns exist only in a chat)")
        return cls(apply, multiturn)

    @property
    def version(self) -> str:
        """The format's name (records' `chat_format`); empty for plain text."""
        return ("chat-multiturn" if self.multiturn else "chat-single") if self.apply else ""

    @property
    def version_parts(self) -> list[str]:
        """What a task version hashes for the format: nothing for plain text, so the versions of
        plain-text tasks (and the runs that resume by them) stay what they were."""
        return [self.version] if self.apply else []

    @property
    def answer_delimiter(self) -> str:
        """What precedes a scored answer: lm-eval's " ", none under a chat template (the answer
        follows the assistant header)."""
        return "" if self.apply else " "

    def sample_field(self, turns: Sequence[Turn]) -> dict:
        """A sample's `chat` data: the messages `render_prompts` renders with the scored model."""
        return {"format": self.version, "messages": self.messages(turns)}

    def messages(self, turns: Sequence[Turn]) -> list[dict]:
        """lm-eval's Message.to_dict per turn (multiturn), or multiturn_to_singleturn."""
        if self.multiturn:
            return [{"role": t.role, "content": t.content} for t in turns]
        system = [{"role": "system", "content": turns[0].content}] if turns[0].role == "system" else []
        rest = list(turns[len(system):])
        rest[-1] = Turn(rest[-1].role, rest[-1].content)   # the question's own delimiter is dropped
        return system + [{"role": "user", "content": as_text(rest)}]


def render_chat(lm: LM, messages: list[dict]) -> tuple[str, bool]:
    """(the text the model continues, whether the system turn had to be dropped). lm-eval retries
    without system turns when the template raises; so does this, for either backend's error
    (transformers raises jinja2's TemplateError, the harness's own tokenizer a UserError)."""
    from jinja2 import TemplateError
    if not lm.has_chat_template:
        raise UserError(f"{lm.name} has no chat template, so task.apply_chat_template=true cannot apply "
                        "one; drop it for a base model, or load the instruct model's tokenizer")
    try:
        return lm.chat_prompt(messages, add_generation_prompt=True), False
    except (TemplateError, UserError) as e:
        without = [m for m in messages if m["role"] != "system"]
        if len(without) == len(messages) or (isinstance(e, UserError) and "chat template error" not in str(e)):
            raise
        return lm.chat_prompt(without, add_generation_prompt=True), True


def render_prompts(lm: LM, samples: list[Sample], key: str, scored_as_text: bool = False) -> list[Sample]:
    """Samples whose chat messages (data["chat"]) are rendered into data[key] (the prompt or
    context the task scores), and, for per-choice contexts (Winogrande), data["contexts"].
    `scored_as_text`: the context is scored by log-likelihood, so it must be text the harness
    holds; an API model whose server renders its own template cannot give that."""
    out = []
    for s in samples:
        chat = s.data.get("chat")
        if chat is None:
            out.append(s)
            continue
        data, dropped, texts = dict(s.data), False, []
        for messages in chat.get("per_choice") or [chat["messages"]]:
            text, d = render_chat(lm, messages)
            if scored_as_text and type(text) is not str:
                raise UserError(f"{lm.name}: its server applies the chat template, so log-likelihoods of "
                                "chat-formatted prompts cannot be asked of it; drop task.apply_chat_template "
                                "(generative tasks can keep it)")
            texts.append(text)
            dropped |= d
        if "per_choice" in chat:
            data["contexts"], data[key] = texts, common_prefix(texts)
        else:
            data[key] = texts[0]
        data["extra"] = {**data.get("extra", {}), "chat_format": chat["format"],
                         **({"system_dropped": True} if dropped else {})}
        out.append(Sample(s.id, data))
    return out


def common_prefix(texts: Sequence[str]) -> str:
    first, last = min(texts), max(texts)
    i = 0
    while i < min(len(first), len(last)) and first[i] == last[i]:
        i += 1
    return first[:i]
