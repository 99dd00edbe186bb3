"""`benchmarks/gpu_proof.sh --dry_run`: the GPU proof's every step on the CPU at a tiny size (a random model saved
locally, train killed after its first checkpoint and resumed, the decode step plain / fixed-shape / compiled, bench
eager and compiled), so the script a lent GPU will run is known to work before it gets one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_proof_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "proof"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_proof.sh"), "--dry_run", str(out)],
                          env={**os.environ, "PY": sys.executable}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train = json.loads((out / "train.json").read_text())
    assert [e["episode"] for e in train["episodes"]] == [1, 2, 3]
    assert "resuming" in (out / "train.log").read_text()
    memory = json.loads((out / "memory.json").read_text())  # on the CPU: the plan, no context to measure
    assert memory["plan_rollout"]["total"] > memory["plan_rollout"]["allocated"] > 0 and memory["context_bytes"] is None  # killed after episode 1, finished by --resume
    decode = json.loads((out / "decode.json").read_text())
    for key in ("plain_ms", "fixed_shape_ms", "compiled_ms", "bytes_per_step", "bandwidth_bytes_per_second",
                "compiled_fraction_of_bandwidth_bound"):
        assert decode[key] > 0, key
    bench = json.loads((out / "bench.json").read_text())
    assert bench["preset"] == "tiny-shape" and bench["compiled_tokens_match"]
    assert bench["compiled_max_reward_difference"] < 1e-4 and bench["update_seconds"] > 0
