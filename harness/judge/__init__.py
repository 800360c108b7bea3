"""LLM-as-judge: clients (Ollama, OpenAI-compatible), single-answer styles, hardening, reliability.

    from harness.judge import OllamaJudge, OpenAIJudge, Judge, Grade, Reply, JudgeConfigError

core.py holds the Judge (retries, cache, concurrency, hardening, self-consistency), clients.py the
two server APIs, styles.py the single-answer prompts and reply parsing, host.py address checks.
"""
from harness.judge.core import Grade, Judge, OllamaJudge, OpenAIJudge, Reply, agreement
from harness.judge.host import JudgeConfigError

__all__ = ["Grade", "Judge", "JudgeConfigError", "OllamaJudge", "OpenAIJudge", "Reply", "agreement"]
