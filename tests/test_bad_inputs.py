"""The catalogue of bad inputs and faults, through the real CLIs: the table's cases run in this
process (clitools.run_module: the entry point's own __main__ block, its exit status and output;
a fresh interpreter per case would spend seconds importing torch), the ones that need a process of
their own (a memory cap, an environment read at import, a kill) in a subprocess.

Every case ends the same way: exit status 2, exactly one `error:` line on stderr (saying what is
wrong and what to do), no traceback, and the leaderboard, the finished run folder and any file the
case points at byte-identical before and after. Cases that need a running process to misbehave
(a busy run folder, a signal to the ladder) are separate tests below the table.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from clitools import ENV, ROOT, SHARED, run_module

GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MMLU = ["task=mmlu", "model=gpt-tiny", "task.subjects=[anatomy]", "task.limit=1"]


def run(module: str, *args, env=ENV, timeout=300, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn)


def assert_bad_input(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(*paths: Path) -> dict:
    """Every file under `paths` (byte contents); absent paths count as absent."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        out[str(root)] = {str(f): f.read_bytes() for f in files if f.name != ".lock"}
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A leaderboard with rows and the finished run folder that wrote them."""
    root = tmp_path_factory.mktemp("world")
    board, run_dir = root / "lb.csv", root / "done"
    p = run_module("harness", *MMLU, f"leaderboard={board}", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr[-3000:]
    text = root / "doc.txt"
    text.write_text("A short document to score.\n")
    tiny_checkpoint(root / "tiny")
    return SimpleNamespace(root=root, board=board, run=run_dir, text=text)


def eval_args(w, tmp: Path, *extra) -> list:
    return [*MMLU, f"leaderboard={w.board}", f"hydra.run.dir={tmp / 'run'}", *extra]


def hf_args(w, tmp: Path, target) -> list:
    return [*MMLU[:1], f"model=hf:{target}", *eval_args(w, tmp)[2:]]


def arc_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arc_row(id_: str, answer: str = "A") -> dict:
    return {"id": id_, "answerKey": answer,
            "question": {"stem": "Which is a gas?", "choices": [{"label": x, "text": t} for x, t in
                                                               zip("ABCD", ["oxygen", "iron", "salt", "wood"])]}}


def tiny_checkpoint(folder: Path) -> Path:
    """A real gpt-tiny checkpoint folder (model.safetensors, config.json, tokenizer, provenance)."""
    code = ("import sys; from models.registry import load_model; from models.checkpoint import save_checkpoint; "
            "m, t, _ = load_model('gpt-tiny'); save_checkpoint(sys.argv[1], m, t, {'id': 'tiny'})")
    subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=ENV, check=True, timeout=120)
    return folder


def cap_memory_4gib() -> None:
    """In the child: at most 4 GiB of address space, so a model built from a config instead of the
    weights file fails (or would be killed) instead of eating the machine."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def mmlu_with_short_dev(tmp: Path) -> dict:
    """HARNESS_DATA holding MMLU anatomy whose dev file has one row."""
    data = tmp / "data"
    (data / "mmlu" / "val").mkdir(parents=True)
    for split in ("test", "dev"):
        (data / "mmlu" / split).mkdir(parents=True)
        src = Path(ENV["HARNESS_DATA"]) / "mmlu" / split / f"anatomy_{split}.csv"
        lines = src.read_text().splitlines(keepends=True)
        (data / "mmlu" / split / src.name).write_text("".join(lines[:1] if split == "dev" else lines[:3]))
    return dict(ENV, HARNESS_DATA=str(data))


# --- the table: name -> (module, args, what the line must say[, env]) built from (world, tmp_path) ---------

def _cases(w, tmp: Path) -> dict:
    folder = tmp / "a_folder"
    folder.mkdir()
    gguf_folder = tmp / "a_folder.gguf"
    gguf_folder.mkdir()
    empty = tmp / "empty.txt"
    empty.write_text("")
    corrupt_board = tmp / "corrupt.csv"
    corrupt_board.write_bytes(w.board.read_bytes() + b'2026-01-01,"unterminated,quote\n')
    pickled = tmp / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    truncated_gguf = tmp / "truncated.gguf"
    truncated_gguf.write_bytes(GGUF.read_bytes()[:4096] if GGUF.exists() else b"GGUF\x03\x00\x00\x00junk")
    no_wandb = tmp / "no_wandb"
    (no_wandb / "wandb").mkdir(parents=True)
    (no_wandb / "wandb" / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    ppl = ["task=perplexity", "model=gpt-tiny", f"leaderboard={w.board}", f"hydra.run.dir={tmp / 'run'}"]
    arc = ["task=arc_easy", "model=gpt-tiny", f"leaderboard={w.board}", f"hydra.run.dir={tmp / 'run'}"]
    not_json = Path(shutil.copytree(w.root / "tiny", tmp / "not_json"))   # the module's, not a new build per case
    (not_json / "config.json").write_text("{architecture: gpt")
    llama_default = tmp / "llama_default"
    shutil.copytree(not_json, llama_default)
    (llama_default / "config.json").write_text('{"architecture": "llama", "config": {}}')
    truncated_st = tmp / "truncated_st"
    shutil.copytree(not_json, truncated_st)
    (truncated_st / "config.json").write_text((w.root / "tiny" / "config.json").read_text())
    weights = (w.root / "tiny" / "model.safetensors").read_bytes()
    (truncated_st / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    no_config = tmp / "no_config"          # model=hf: folders
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    seq2seq = tmp / "t5"
    seq2seq.mkdir()
    (seq2seq / "config.json").write_text(json.dumps({"model_type": "t5",
                                                     "architectures": ["T5ForConditionalGeneration"]}))
    hf_truncated = tmp / "hf_truncated"
    hf_truncated.mkdir()
    (hf_truncated / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}))
    (hf_truncated / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {")
    corrupt_run = tmp / "corrupt_run"
    shutil.copytree(w.run, corrupt_run)
    records = corrupt_run / "records.jsonl"
    records.write_text("{not json\n" + records.read_text())
    # the judged tasks and the judge: a model that does not exist, so an error raised after the model
    # load would name it instead; nothing listens on port 9 of loopback
    never_loaded = tmp / "never_loaded"

    def judged(task: str, *extra: str) -> list:
        return [f"task={task}", f"model={never_loaded}", f"leaderboard={w.board}", f"hydra.run.dir={tmp / 'run'}",
                *extra]

    empty_folder = tmp / "no_runs"
    empty_folder.mkdir()
    return {
        # configuration values
        "unknown_task": ("harness", ["task=nope", f"leaderboard={w.board}"], ["unknown task 'nope'", "mmlu"]),
        "unknown_model": ("harness", ["model=nope", f"leaderboard={w.board}"], ["unknown model 'nope'"]),
        "misspelt_key": ("harness", eval_args(w, tmp, "task.limt=3"), ["Could not override 'task.limt'", "+task.limt=3"]),
        "override_syntax": ("harness", eval_args(w, tmp, "task.limit=["), ["no viable alternative"]),
        "seed_not_a_number": ("harness", eval_args(w, tmp, "seed=abc"), ["seed='abc'", "whole number"]),
        "limit_negative": ("harness", eval_args(w, tmp, "task.limit=-3"), ["task.limit=-3", "0 or more"]),
        "limit_text": ("harness", eval_args(w, tmp, "task.limit=abc"), ["task.limit='abc'"]),
        "limit_fraction": ("harness", eval_args(w, tmp, "task.limit=2.5"), ["task.limit=2.5"]),
        "num_fewshot_negative": ("harness", eval_args(w, tmp, "task.num_fewshot=-1"), ["task.num_fewshot=-1"]),
        "chunk_size_zero": ("harness", eval_args(w, tmp, "chunk_size=0"), ["chunk_size=0", "1 or more"]),
        "contamination_ngram_negative": ("harness", eval_args(w, tmp, "contamination_ngram=-2"),
                                         ["contamination_ngram=-2"]),
        "append_again_not_bool": ("harness", eval_args(w, tmp, "append_again=maybe"), ["append_again", "true or false"]),
        "stride_zero": ("harness", [*ppl, f"task.path={w.text}", "task.stride=0"], ["task.stride=0"]),
        # data files
        "perplexity_empty_file": ("harness", [*ppl, f"task.path={empty}"], [str(empty), "empty"]),
        "task_path_is_a_folder": ("harness", [*ppl, f"task.path={folder}"], [str(folder), "folder"]),
        "duplicate_sample_ids": ("harness", [*arc, f"task.path={arc_file(tmp / 'dup.jsonl', [arc_row('q1'), arc_row('q1')])}"],
                                 ["dup.jsonl:2", "'q1'", "line 1"]),
        "answer_not_a_label": ("harness", [*arc, f"task.path={arc_file(tmp / 'label.jsonl', [arc_row('q1', 'E')])}"],
                               ["label.jsonl:1", "'E'", "not one of the row's labels A, B, C, D"]),
        "mmlu_fewshot_shortfall": ("harness", eval_args(w, tmp, "task.num_fewshot=2"),
                                   ["anatomy_dev.csv has 1 rows", "task.fewshot_shortfall=allow"],
                                   {"env": mmlu_with_short_dev(tmp)}),
        "corrupt_records": ("harness", [*MMLU, f"leaderboard={w.board}", f"hydra.run.dir={corrupt_run}"],
                            ["records.jsonl:1", "corrupt record"]),
        # leaderboard
        "leaderboard_is_a_folder": ("harness", [*MMLU, f"leaderboard={folder}", f"hydra.run.dir={tmp / 'run'}"],
                                    ["is a folder"]),
        "leaderboard_under_a_file": ("harness", [*MMLU, f"leaderboard={w.text}/lb.csv", f"hydra.run.dir={tmp / 'run'}"],
                                     ["is a file, not a folder"]),
        "leaderboard_corrupt_body": ("harness", [*MMLU, f"leaderboard={corrupt_board}", f"hydra.run.dir={tmp / 'run'}"],
                                     ["corrupt.csv cannot be read", "EOF inside string"]),
        "render_corrupt_leaderboard": ("harness.leaderboard", [f"leaderboard={corrupt_board}", f"out_dir={tmp / 'out'}"],
                                       ["corrupt.csv"]),
        # model files
        "truncated_safetensors": ("harness", [*MMLU[:1], f"model={truncated_st}", *eval_args(w, tmp)[2:]],
                                  ["model.safetensors"]),
        "config_not_json": ("harness", [*MMLU[:1], f"model={not_json}", *eval_args(w, tmp)[2:]],
                            [f"cannot read {not_json}/config.json", "restore the config.json"]),
        # a 7B default config beside tiny weights: refused from the file's header, under a 4 GiB cap
        "config_bigger_than_weights": ("harness", [*MMLU[:1], f"model={llama_default}", *eval_args(w, tmp)[2:]],
                                       ["describes a llama model of 6.74B parameters", "holds"],
                                       {"preexec_fn": cap_memory_4gib}),
        "device_not_on_this_machine": ("harness", eval_args(w, tmp, "model.device=cuda:7"),
                                       ["model.device=cuda:7", "devices here: cpu"]),
        "hf_folder_without_config": ("harness", hf_args(w, tmp, no_config), [str(no_config), "has no config.json",
                                                                           "save_pretrained"]),
        "hf_not_a_causal_lm": ("harness", hf_args(w, tmp, seq2seq), ["'t5' model", "not a causal language model"]),
        "hf_hub_id_offline": ("harness", hf_args(w, tmp, "no-such-org/no-such-model"),
                              ["could not download no-such-org/no-such-model", "model=hf:<folder>"],
                              {"env": dict(ENV, HF_HUB_OFFLINE="1")}),
        "hf_truncated_safetensors": ("harness", hf_args(w, tmp, hf_truncated),
                                     [str(hf_truncated), "transformers cannot load it", "save_pretrained"]),
        "serve_hf_model": ("harness.serve", [f"model=hf:{seq2seq}"], ["harness.serve serves the harness's own models"]),
        "pickle_checkpoint": ("harness", [*MMLU[:1], f"model={pickled}", *eval_args(w, tmp)[2:]], ["pickle"]),
        "truncated_gguf": ("harness", [*MMLU[:1], f"model={truncated_gguf}", *eval_args(w, tmp)[2:]], ["truncated"]),
        # the other entry points
        "train_unknown_recipe": ("harness.train", ["train=nope"], ["unknown train 'nope'"]),
        "train_resume_must_without_a_run": ("harness.train", ["train=pretrain_tiny", "resume=must",
                                                              f"output_dir={tmp / 'nothing_here'}"], ["resume=must"]),
        "train_resume_not_bool": ("harness.train", ["train=pretrain_tiny", "resume=maybe",
                                                    f"output_dir={tmp / 'nothing_here'}"], ["resume='maybe'"]),
        "compare_out_is_a_folder": ("harness.compare", [f"a={w.run}", f"b={w.run}", f"out={folder}"], ["is a folder"]),
        "compare_missing_b": ("harness.compare", [f"a={w.run}"], ["missing value for b"]),
        "serve_port_not_a_number": ("harness.serve", ["model=gpt-tiny", "port=abc"], ["port='abc'"]),
        "serve_port_out_of_range": ("harness.serve", ["model=gpt-tiny", "port=99999"], ["port=99999"]),
        "export_out_is_a_folder": ("harness.export", ["model=gpt-tiny", f"out={gguf_folder}"], ["is a folder"]),
        "serve_max_batch_zero": ("harness.serve", ["model=gpt-tiny", "max_batch=0"], ["max_batch=0", "1 or more"]),
        # API-served models: nothing listens on port 9 of loopback (the discard port)
        "openai_server_unreachable": ("harness", [*MMLU[:1], "model=openai:m", "model.base_url=http://127.0.0.1:9/v1",
                                                  *eval_args(w, tmp)[2:]],
                                      ["model.base_url=http://127.0.0.1:9/v1", "cannot reach"]),
        "openai_base_url_not_a_url": ("harness", [*MMLU[:1], "model=openai:m", "model.base_url=localhost:8000",
                                                  *eval_args(w, tmp)[2:]],
                                      ["model.base_url='localhost:8000'", "http://127.0.0.1:8000/v1"]),
        "api_model_concurrency_zero": ("harness", [*MMLU[:1], "model=ollama:m", "model.concurrency=0",
                                                   *eval_args(w, tmp)[2:]], ["model.concurrency >= 1"]),
        "ollama_server_unreachable": ("harness", [*MMLU[:1], "model=ollama:m", "model.host=http://127.0.0.1:9",
                                                  *eval_args(w, tmp)[2:]],
                                      ["model.host=http://127.0.0.1:9", "cannot reach Ollama"]),
        # judged tasks and their judge, refused before the model loads
        "mt_bench_unknown_category": ("harness", judged("mt_bench", "task.categories=[cooking]"),
                                      ["task.categories=['cooking']", "no MT-Bench category 'cooking'", "writing"]),
        "pairwise_unknown_data": ("harness", judged("pairwise", "task.data=nonsense"),
                                  ["task.data='nonsense'", "instruct, mt_bench"]),
        "pairwise_opponent_no_folder": ("harness", judged("pairwise", "task.opponent=run:/no/such/folder"),
                                        ["task.opponent=run:/no/such/folder", "is not a folder",
                                         "pass a run folder written by python -m harness"]),
        "pairwise_opponent_unknown_kind": ("harness", judged("pairwise", "task.opponent=champion"),
                                           ["task.opponent='champion'", "reference or run:<run folder>"]),
        "pairwise_mt_bench_reference": ("harness", judged("pairwise", "task.data=mt_bench", "task.limit=1"),
                                        ["task.opponent=reference needs task.data=instruct",
                                         "task.opponent=run:<a run folder>"]),
        "judge_base_url_not_a_url": ("harness", judged("mt_bench", "judge=openai", "judge.base_url=notaurl"),
                                     ["judge.base_url='notaurl'", "http://127.0.0.1:8000/v1"]),
        "judge_server_unreachable": ("harness", judged("mt_bench", "judge=openai", "judge.base_url=http://127.0.0.1:9/v1",
                                                       "judge.retries=0", "task.limit=1"),
                                     ["cannot reach the judge at judge.base_url=http://127.0.0.1:9/v1",
                                      "start the server"]),
        "judge_consistency_temperature_negative": ("harness", judged("mt_bench", "judge.self_consistency=true",
                                                                     "judge.consistency_temperature=-1"),
                                                   ["judge.consistency_temperature", "[0, 2]", "-1"]),
        "judge_consistency_temperature_too_high": ("harness", judged("mt_bench", "judge=openai", "judge.self_consistency=true",
                                                                     "judge.consistency_temperature=5"),
                                                   ["judge.consistency_temperature", "[0, 2]", "5"]),
        # training and the arena
        "train_unknown_strategy": ("harness.train", ["train=pretrain_tiny", "strategy=bogus",
                                                     f"output_dir={tmp / 'train_out'}"],
                                   ["strategy", "'bogus'", "ddp, fsdp"]),
        "train_compile_not_bool": ("harness.train", ["train=pretrain_tiny", "compile=yes",
                                                     f"output_dir={tmp / 'train_out'}"],
                                   ["compile='yes'", "expected true or false"]),
        "eval_compile_not_bool": ("harness", [*ppl, f"task.path={w.text}", "model.compile=sometimes"],
                                  ["model.compile='sometimes'", "expected true or false"]),
        # experiment trackers (harness/trackers): an unknown one, or its library not installed (a `wandb`
        # package first on the path that fails to import, as a missing one does)
        "train_unknown_logger": ("harness.train", ["train=pretrain_tiny", "logger=[tensorboard,nope]",
                                                   f"output_dir={tmp / 'train_out'}"],
                                 ["unknown logger 'nope'", "valid: tensorboard, wandb, mlflow"]),
        "eval_unknown_logger": ("harness", eval_args(w, tmp, "logger=nope"), ["logger='nope'", "unknown logger 'nope'"]),
        "view_host_not_loopback": ("harness.view", ["host=0.0.0.0", f"out_dir={tmp / 'site'}"],
                                   ["host=0.0.0.0", "127.0.0.1 only"]),
        "suite_unknown": ("harness.suite", ["suite=nope", "model=gpt-tiny"], ["suite/nope", "openllm"]),
        "gsm8k_unknown_fewshot_sampler": ("harness", ["task=gsm8k", "task.fewshot_sampler=sometimes", "task.limit=1",
                                                      "model=gpt-tiny", *eval_args(w, tmp)[4:]],
                                          ["fewshot_sampler must be one of first_n, random", "'sometimes'"]),
        "multiturn_without_chat_template": ("harness", ["task=mmlu", "task.fewshot_as_multiturn=true", "model=gpt-tiny",
                                                        *eval_args(w, tmp)[4:]],
                                            ["task.fewshot_as_multiturn=true needs task.apply_chat_template=true"]),
        "chat_template_not_bool": ("harness", ["task=gsm8k", "task.apply_chat_template=yes", "model=gpt-tiny",
                                               *eval_args(w, tmp)[4:]],
                                   ["task.apply_chat_template='yes': expected true or false"]),
        "chat_template_model_without_one": ("harness", [*MMLU, "task.apply_chat_template=true", *eval_args(w, tmp)[4:]],
                                            ["has no chat template", "drop it for a base model"]),
        "arc_unknown_fewshot_sampler": ("harness", ["task=arc_easy", "task.num_fewshot=1", "task.fewshot_sampler=sometimes",
                                                    "model=gpt-tiny", *eval_args(w, tmp)[4:]],
                                        ["fewshot_sampler must be one of first_n, random", "'sometimes'"]),
        "suite_chat_template_not_bool": ("harness.suite", ["suite=openllm", "model=gpt-tiny", "apply_chat_template=yes",
                                                           *eval_args(w, tmp)[4:]],
                                         ["apply_chat_template='yes': expected true or false"]),
        "suite_multiturn_without_chat_template": ("harness.suite", ["suite=openllm", "model=gpt-tiny",
                                                                    "fewshot_as_multiturn=true", *eval_args(w, tmp)[4:]],
                                                  ["fewshot_as_multiturn=true needs apply_chat_template=true"]),
        "train_logger_not_installed": ("harness.train", ["train=pretrain_tiny", "logger=wandb",
                                                         f"output_dir={tmp / 'train_out'}"],
                                       ["logger=wandb needs the wandb package: pip install 'harness[wandb]'"],
                                       {"env": dict(ENV, PYTHONPATH=os.pathsep.join([str(no_wandb), ENV["PYTHONPATH"]]))}),
        "arena_no_runs": ("harness.arena", [f"runs={empty_folder}", f"out_dir={tmp / 'arena'}"],
                          ["no pairwise run folder", "run python -m harness task=pairwise first"]),
    }


CASE_NAMES = [
    "unknown_task", "unknown_model", "misspelt_key", "override_syntax", "seed_not_a_number", "limit_negative", "limit_text", "limit_fraction",
    "num_fewshot_negative", "chunk_size_zero", "contamination_ngram_negative", "append_again_not_bool",
    "stride_zero", "perplexity_empty_file", "task_path_is_a_folder", "duplicate_sample_ids",
    "answer_not_a_label", "mmlu_fewshot_shortfall", "corrupt_records", "leaderboard_is_a_folder",
    "leaderboard_under_a_file", "leaderboard_corrupt_body", "render_corrupt_leaderboard", "pickle_checkpoint",
    "truncated_gguf", "truncated_safetensors", "config_not_json", "config_bigger_than_weights", "device_not_on_this_machine",
    "hf_folder_without_config", "hf_not_a_causal_lm", "hf_hub_id_offline", "hf_truncated_safetensors",
    "serve_hf_model",
    "train_unknown_recipe", "train_resume_must_without_a_run", "train_resume_not_bool",
    "compare_out_is_a_folder", "compare_missing_b", "serve_port_not_a_number", "serve_port_out_of_range",
    "export_out_is_a_folder", "serve_max_batch_zero", "openai_server_unreachable", "ollama_server_unreachable",
    "openai_base_url_not_a_url", "api_model_concurrency_zero",
    "mt_bench_unknown_category", "pairwise_unknown_data", "pairwise_opponent_no_folder",
    "pairwise_opponent_unknown_kind", "pairwise_mt_bench_reference", "judge_base_url_not_a_url",
    "judge_server_unreachable", "judge_consistency_temperature_negative", "judge_consistency_temperature_too_high",
    "train_unknown_strategy", "train_compile_not_bool", "eval_compile_not_bool", "arena_no_runs",
    "train_unknown_logger", "eval_unknown_logger", "train_logger_not_installed",
    "view_host_not_loopback", "suite_unknown", "gsm8k_unknown_fewshot_sampler",
    "multiturn_without_chat_template", "chat_template_not_bool", "chat_template_model_without_one",
    "arc_unknown_fewshot_sampler", "suite_chat_template_not_bool", "suite_multiturn_without_chat_template",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_exit_2_and_nothing_changes(name, world, tmp_path):
    cases = _cases(world, tmp_path)
    assert set(cases) == set(CASE_NAMES)
    module, args, needles, *options = cases[name]
    paths = [a.split("=", 1) for a in map(str, args) if "=" in a and not a.startswith("hydra.")]
    watched = [world.board, world.run, *(Path(v) for _, v in paths if v.startswith("/"))]
    before = snapshot(*watched)
    p = run(module, *args, **options[0]) if options else run_module(module, *args)
    assert_bad_input(p, *needles)
    assert snapshot(*watched) == before
    assert not list(tmp_path.rglob(".*.tmp")), "a temporary file was left behind"
    assert not (tmp_path / "run" / "records.jsonl").exists(), "the new run folder got a records file"


# --- cases that need a process to misbehave ----------------------------------------------------

def test_mmlu_fewshot_shortfall_allowed_records_the_real_count(tmp_path):
    board = tmp_path / "lb.csv"
    p = run("harness", *MMLU, "task.num_fewshot=2", "task.fewshot_shortfall=allow", f"leaderboard={board}",
            f"hydra.run.dir={tmp_path / 'run'}", env=mmlu_with_short_dev(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    import pandas as pd
    assert set(pd.read_csv(board).num_fewshot) == {1}


def test_busy_run_folder_is_refused_before_the_model_loads(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # a model path that does not exist: had the model been loaded first, the error would name it
        p = run("harness", "task=mmlu", f"model={tmp_path / 'never_loaded'}", f"leaderboard={tmp_path / 'lb.csv'}",
                f"hydra.run.dir={run_dir}")
    finally:
        os.close(fd)
    assert_bad_input(p, "in use by another harness process")
    assert not (tmp_path / "lb.csv").exists()


def test_resume_into_an_empty_output_dir_warns_and_starts_fresh(tmp_path):
    out = tmp_path / "fresh"
    p = run("harness.train", "train=pretrain_tiny", "train.max_steps=1", "progress=false", "resume=true",
            f"output_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "holds no run: starting from scratch" in p.stdout + p.stderr
    assert json.loads((out / "provenance.json").read_text())["complete"]


def test_read_only_leaderboard_folder_is_refused_before_scoring(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere: a read-only folder cannot be made here")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        p = run("harness", *MMLU, f"leaderboard={ro / 'lb.csv'}", f"hydra.run.dir={tmp_path / 'run'}")
    finally:
        ro.chmod(0o755)
    assert_bad_input(p, "no write permission")
    assert not (tmp_path / "run" / "records.jsonl").exists()


def test_kill_9_mid_run_resumes_to_the_same_records(tmp_path):
    """SIGKILL while records are being appended, then the same command: the result equals an
    uninterrupted run's, sample by sample, and the leaderboard gets its rows once."""
    import signal
    import time

    args = ["task=mmlu", "model=gpt-tiny", "task.subjects=[anatomy,astronomy,virology]", "task.limit=12",
            "chunk_size=2"]
    board, run_dir = tmp_path / "lb.csv", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "harness", *args, f"leaderboard={board}",
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    records = run_dir / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not records.exists() or records.read_text().count("\n") < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not board.exists(), "killed before the end, yet rows were appended"
    resumed = run("harness", *args, f"leaderboard={board}", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reusing" in resumed.stdout + resumed.stderr
    clean = run("harness", *args, f"leaderboard={tmp_path / 'clean.csv'}", f"hydra.run.dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr[-3000:]

    def scores(folder):
        rows = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines() if line]
        return {r["sample_id"]: (r["prediction"], r["scores"]) for r in rows}

    assert scores(run_dir) == scores(tmp_path / "clean") and len(scores(run_dir)) == 36
    import pandas as pd
    killed, fresh = pd.read_csv(board), pd.read_csv(tmp_path / "clean.csv")
    assert list(killed.value) == list(fresh.value)
