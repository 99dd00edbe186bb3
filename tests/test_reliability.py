"""A long run survives being killed, bad input never costs a run, and faults are survived or reported."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnrl_core.__main__ import main
from attnrl_core.checkpoint import latest_valid_checkpoint, list_checkpoints
from attnrl_core.files import read_jsonl

from .killpoints import wait_for_line

SMALL = ["--preset", "embedded", "--generation_batch_size", "2", "--training_batch_size", "1", "--num_kv_pairs", "3",
         "--tokens_per_key", "8", "--tokens_per_value", "8", "--tokens_per_query", "6", "--warmup_trajectories", "2",
         "--filter_num_sd", "0", "--learning_rate", "1e-3", "--checkpoint_every", "1", "--no_progress",
         "--num_threads", "1"]  # fixed: an automatic count follows the processes running beside, and sums with it


def _adapter(run_dir: Path, episode: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"episode-{episode}" / "adapter_model.safetensors")


def _snapshot(path: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()} if path.exists() else {}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *SMALL, "--num_episodes", "5", "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "attnrl_core", "train", *SMALL, "--num_episodes", "5",
                             "--output_dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "checkpoint episode-2 written")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_jsonl(out / "metrics.jsonl"))
    assert done < 5, "killed too late to test anything"
    assert main(["train", "--resume", "--output_dir", str(out), "--no_progress"]) == 0
    ref, got = _adapter(reference_run, 5), _adapter(out, 5)
    assert ref.keys() == got.keys()
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) <= 1e-6
    assert [m["reward"] for m in read_jsonl(out / "metrics.jsonl")] == \
        [m["reward"] for m in read_jsonl(reference_run / "metrics.jsonl")]
    assert [m["episode"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert len(read_jsonl(out / "trajectories.jsonl")) == 5 * 2


@pytest.mark.slow
def test_broken_checkpoint_is_skipped_for_the_previous_one(reference_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    newest = list_checkpoints(run)[-1]
    data = (newest / "adapter_model.safetensors").read_bytes()
    (newest / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="truncated"):
        assert latest_valid_checkpoint(run) == list_checkpoints(run)[-2]
    (list_checkpoints(run)[-2] / "state.json").unlink()
    with pytest.warns(UserWarning) as caught:
        assert latest_valid_checkpoint(run) == list_checkpoints(run)[-3]
    assert [str(w.message).split(":", 1)[1].strip() for w in caught] == [
        "adapter_model.safetensors is truncated or altered", "state.json is missing"]


@pytest.mark.slow
def test_keep_last_checkpoints(tmp_path):
    out = tmp_path / "keep"
    assert main(["train", *SMALL, "--num_episodes", "3", "--keep_checkpoints", "2", "--output_dir", str(out)]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["episode-2", "episode-3"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "attnrl_core", "train", *SMALL, "--num_episodes", "50",
                             "--checkpoint_every", "100", "--log_every", "1", "--output_dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(proc, "episode 1/50")
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=1800)  # a guard against a hang, not a time limit
    assert proc.returncode == 0
    assert "--resume" in stdout
    episodes = len(read_jsonl(out / "metrics.jsonl"))
    assert episodes < 50 and [p.name for p in list_checkpoints(out)] == [f"episode-{episodes}"]


# -- bad input: one line, exit 2, no traceback, nothing written --------------------------------------------
BAD_INPUTS = {
    "negative lr": (["--learning_rate", "-1e-4"], "learning_rate"),
    "negative beta": (["--kl_beta", "-0.1"], "kl_beta"),
    "subset fraction 0": (["--subset_fraction", "0"], "subset_fraction"),
    "subset fraction > 1": (["--subset_fraction", "1.5"], "subset_fraction"),
    "zero key tokens": (["--tokens_per_key", "0"], "tokens_per_key"),
    "zero batch": (["--generation_batch_size", "0"], "generation_batch_size"),
    "one kv pair": (["--num_kv_pairs", "1"], "num_kv_pairs"),
    "training batch > generation batch": (["--training_batch_size", "100"], "training_batch_size"),
    "not a number": (["--num_episodes", "many"], "num_episodes"),
    "unknown flag": (["--learning_rat", "1e-3"], "unrecognized arguments"),
    "missing config file": (["--config", "/nonexistent/c.json"], "does not exist"),
    "malformed config file": (["--config", "MALFORMED"], "malformed"),
    "unknown preset": (["--preset", "gpt-5"], "preset"),
    "model not found offline": (["--model_name", "/nonexistent/model-dir"], "cannot be found"),
    "dataset not found": (["--dataset_name", "/nonexistent/dataset"], "cannot be loaded"),
    "no article long enough": (["--num_kv_pairs", "5000", "--max_scan_articles", "30"], "num_kv_pairs <="),
    "impossible num_kv_pairs": (["--num_kv_pairs", "100000"], "longest training article"),
    "unknown tracker": (["--report_to", "mlflow"], "unknown tracker"),
    "negative threads": (["--num_threads", "-1"], "num_threads"),
    "cuda without cuda": (["--device", "cuda"], "CUDA is not available"),
    "unknown dtype": (["--dtype", "int3"], "dtype"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_in_one_line(case, tmp_path, capsys):
    args, expected = BAD_INPUTS[case]
    args = [str(tmp_path / "bad.json") if a == "MALFORMED" else a for a in args]
    (tmp_path / "bad.json").write_text("{oops")
    out = tmp_path / "run"
    try:
        code = main(["train", "--preset", "embedded", "--no_progress", *args, "--output_dir", str(out)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_resume_without_checkpoint_and_existing_run_are_refused(reference_run, tmp_path, capsys):
    before = _snapshot(reference_run)
    assert main(["train", *SMALL, "--output_dir", str(reference_run)]) == 2
    assert "not empty" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"preset": "embedded"}))
    assert main(["train", "--resume", "--output_dir", str(empty)]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err
    assert _snapshot(reference_run) == before


@pytest.mark.slow
def test_cli_exit_code_in_a_real_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "attnrl_core", "train", "--preset", "embedded", "--kl_beta", "-1",
                          "--output_dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "kl_beta" in res.stderr


# -- faults during training ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_out_of_memory_in_rollout_and_update_is_survived(tmp_path, monkeypatch):
    import attnrl_core.resilience as res

    real_rollout, real_update = res.rollout, res.update_policy

    def rollout(model, batch, *a, **k):
        if batch.batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_rollout(model, batch, *a, **k)

    def update(*a, training_batch_size, **k):
        if training_batch_size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_update(*a, training_batch_size=training_batch_size, **k)

    monkeypatch.setattr(res, "rollout", rollout)
    monkeypatch.setattr(res, "update_policy", update)
    out = tmp_path / "oom"
    assert main(["train", *SMALL, "--training_batch_size", "2", "--num_episodes", "3", "--output_dir", str(out)]) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert metrics[-1]["rollout_chunk"] == 1 and metrics[-1]["oom_events"] >= 2
    assert sum(m["selected"] for m in metrics) > 0 and metrics[-1]["micro_batch"] == 1


@pytest.mark.slow
def test_out_of_memory_below_size_one_gives_up(tmp_path, monkeypatch, capsys):
    import attnrl_core.resilience as res

    def rollout(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(res, "rollout", rollout)
    with pytest.raises(RuntimeError, match="even one trajectory"):
        main(["train", *SMALL, "--num_episodes", "2", "--output_dir", str(tmp_path / "o")])


@pytest.mark.slow
def test_non_finite_rewards_are_skipped_then_stop(tmp_path, monkeypatch):
    import attnrl_core.resilience as res

    real_rollout = res.rollout

    def rollout(*a, **k):
        traj = real_rollout(*a, **k)
        traj.rewards = traj.rewards.clone()  # rollout tensors are inference tensors: copy before writing
        traj.rewards[:, 0] = float("nan")
        return traj

    monkeypatch.setattr(res, "rollout", rollout)
    out = tmp_path / "nan"
    with pytest.raises(RuntimeError, match="3 consecutive episodes with a non-finite"):
        main(["train", *SMALL, "--num_episodes", "10", "--max_nonfinite", "3", "--output_dir", str(out)])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 2 and all(m["reward"] is None and m["skipped_steps"] == 1 for m in metrics)
    for ckpt in list_checkpoints(out):  # whatever was checkpointed is finite
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter_model.safetensors").values())
        assert json.loads((ckpt / "state.json").read_text())["stats"]["count"] == 0


@pytest.mark.slow
def test_doctor_prints_a_table():
    res = subprocess.run([sys.executable, "-m", "attnrl_core", "doctor"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    for check in ("torch", "bitsandbytes Adam8bit", "embedded model", "CUDA", "disk for checkpoints"):
        assert check in res.stdout


@pytest.mark.slow
def test_a_moved_run_resumes_where_it_is_now(reference_run, tmp_path):
    """config.json records the directory a run started in; `--resume --output_dir NEW` continues in NEW."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(reference_run, moved)
    before = _snapshot(reference_run)
    assert main(["train", "--resume", "--output_dir", str(moved), "--num_episodes", "6", "--no_progress"]) == 0
    assert [m["episode"] for m in read_jsonl(moved / "metrics.jsonl")][-1] == 6
    assert _snapshot(reference_run) == before
    assert json.loads((moved / "config.json").read_text())["output_dir"] == str(moved)
