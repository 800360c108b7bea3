"""bench/gpu.sh is written for a GPU machine and runs for minutes, so CI checks only what is cheap:
the shell script parses, and the driver's options, skip rules and table work without torch work."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clitools import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_bench  # noqa: E402


def test_gpu_sh_parses_and_helps():
    subprocess.run(["bash", "-n", str(ROOT / "bench/gpu.sh")], check=True)
    p = subprocess.run(["bash", str(ROOT / "bench/gpu.sh"), "--help"], capture_output=True, text=True, check=True)
    assert "--device cpu --smoke" in p.stdout and "--prepare" in p.stdout
    p = subprocess.run(["bash", str(ROOT / "bench/gpu.sh"), "--bogus"], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown option --bogus" in p.stderr


def test_driver_arguments():
    a = gpu_bench.parse(["--arm", "train", "--part", "x.json", "--device", "cpu", "--smoke"])
    assert (a.arm, a.device, a.smoke) == ("train", "cpu", True)
    for bad in (["--arm", "train"], ["--arms", "train,bogus"], ["--arm", "dp", "--part", "p", "--collect", "d"]):
        with pytest.raises(SystemExit):
            gpu_bench.parse(bad)


def test_missing_model_is_a_skip_reason(tmp_path):
    a = gpu_bench.parse(["--models", str(tmp_path), "--data", str(tmp_path), "--smoke"])
    why = gpu_bench.missing("decode", a)
    assert why is not None and ("not found" in why or "not installed" in why)


def test_collect_marks_an_arm_without_a_part_failed(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({"arm": "train", "status": "skipped: no torch"}))
    out = tmp_path / "all.json"
    assert gpu_bench.main(["--collect", str(tmp_path), "--out", str(out), "--arms", "train,dp", "--smoke"]) == 0
    arms = json.loads(out.read_text())["arms"]
    assert [r["status"] for r in arms] == ["skipped: no torch", "failed: no result written (see the log)"]
