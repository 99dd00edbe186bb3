"""Data-parallel training (torchrun, gloo on the CPU): the same run whatever the number of processes.

A two-process run, a one-process run of the same global batch, a two-process run killed and resumed
by one process, and two one-process "nodes" meeting at a rendezvous on 127.0.0.1 must select the
same trajectories and end with the same adapter. The ranks roll out batches of a different size,
whose matrix products round differently (1e-7), and Adam's normalised first steps (a step of about
±lr whatever the gradient's size) turn a weight whose gradient is rounding noise into a difference of
up to 2·lr a step. So "the same adapter" is: almost every weight equal to 1e-6, and the few that are
not within Adam's bound. A fault of the data parallelism (a rank's trajectories weighted wrongly, a
gradient not reduced) moves most weights, and the loss and gradient norm compared beside it.
Measured at lr 1e-4: 75 of 460,800 weights beyond 1e-6, the largest 3e-5 (torch 2.13, transformers
5.25); at lr 1e-3, 11 beyond 1e-5, the largest 4e-5; one process with 1 or 2 threads differs by
2e-3 for the same reason.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import torch

from attnrl_core.distributed import Ranks, Rows, global_draw
from attnrl_core.files import read_jsonl
from attnrl_core.resilience import FallbackState, rollout_resilient
from attnrl_core.rollout import choose_pairs, rollout

from attnrl_core.model import head_geometry

from .conftest import SEP, make_batch, tiny_config
from .killpoints import final_adapter, max_difference, wait_for_line

LEARNING_RATE = 1e-4
# A micro-batch of 4: an optimizer step holds trajectories of both processes, so the weighting across them counts
ARGS = ["--preset", "embedded", "--generation_batch_size", "4", "--training_batch_size", "4", "--num_kv_pairs", "3",
        "--tokens_per_key", "8", "--tokens_per_value", "8", "--tokens_per_query", "6", "--warmup_trajectories", "2",
        "--filter_num_sd", "0", "--learning_rate", str(LEARNING_RATE), "--lora_dropout", "0", "--checkpoint_every", "1",
        "--no_progress", "--num_episodes", "3", "--num_threads", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]  # --multi_gpu: torchrun's launcher (gloo here)


def _train(out, launcher: list[str] | None = None, via: list[str] = TORCHRUN, **popen) -> subprocess.Popen:
    args = ["-m", "attnrl_core", "train", *ARGS, "--output_dir", str(out)]
    cmd = [*via, *launcher, *args] if launcher else [sys.executable, *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_run(a, b) -> None:
    """Same selection, rewards to 1e-5, the same update (loss, KL, gradient norm, tokens read) and the same
    final adapter: fewer than 0.1% of its weights beyond 1e-6 apart, none beyond Adam's 2·lr a step."""
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [m["episode"] for m in ma] == [m["episode"] for m in mb] == [1, 2, 3]
    assert max(abs(x["reward"] - y["reward"]) for x, y in zip(ma, mb)) <= 1e-5
    for key in ("loss", "policy_loss", "kl", "grad_norm", "optimizer_steps", "selected"):  # None: nothing selected
        x, y = [m[key] for m in ma], [m[key] for m in mb]
        assert [v is None for v in x] == [v is None for v in y], key
        assert [v for v in x if v is not None] == pytest.approx([v for v in y if v is not None], rel=1e-4, abs=1e-6), key
    tokens = [[round(m["tokens_per_second"] * m["seconds"]) for m in ms] for ms in (ma, mb)]
    assert tokens[0] == tokens[1]
    ta, tb = read_jsonl(a / "trajectories.jsonl"), read_jsonl(b / "trajectories.jsonl")
    assert [t["selected"] for t in ta] == [t["selected"] for t in tb] and any(t["selected"] for t in ta)
    assert [[s["pair"] for s in t["steps"]] for t in ta] == [[s["pair"] for s in t["steps"]] for t in tb]
    assert max(abs(x["reward"] - y["reward"]) for x, y in zip(ta, tb)) <= 1e-5
    wa, wb = final_adapter(a, 3), final_adapter(b, 3)
    apart = sum(int(((wa[k] - wb[k]).abs() > 1e-6).sum()) for k in wa)
    assert apart < 1e-3 * sum(w.numel() for w in wa.values()), apart
    assert max_difference(wa, wb) <= 2 * LEARNING_RATE * 3


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "one"
    _finish(_train(out))
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "two"
    _finish(_train(out, ["--standalone", "--nproc_per_node", "2"]))
    return out


# -- the pieces, in one process --------------------------------------------------------------------
def test_a_global_draw_sliced_is_the_whole_batch_draw():
    def draw(m):
        return torch.rand(m, 3, generator=torch.Generator().manual_seed(7))

    whole = draw(8)  # two blocks of 4 rows (policy, base)
    part = global_draw(4, Rows(1, 3, 4), draw)
    assert torch.equal(part, torch.cat([whole[1:3], whole[5:7]]))
    assert torch.equal(global_draw(8, None, draw), whole) and torch.equal(global_draw(8, Rows(0, 4, 4), draw), whole)


def test_pair_choice_is_torch_multinomials_own_draw():
    """A single process chooses exactly as `torch.multinomial` did before data parallelism."""
    probs = torch.softmax(torch.randn(6, 9, generator=torch.Generator().manual_seed(0)), dim=1)
    available = torch.ones(6, 9, dtype=torch.bool)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    got, _ = choose_pairs(probs, available, "attention", False, torch.Generator().manual_seed(3))
    assert torch.equal(got, expected)


def test_rollout_of_a_batch_in_two_row_ranges_is_the_whole_rollout(policy):
    cfg, sep, geo = tiny_config(), SEP, head_geometry(policy)
    model, batch = policy, make_batch(policy, cfg)
    B = batch.batch_size
    kw = dict(tokens_per_query=cfg.tokens_per_query, generator=None)
    torch.manual_seed(11)
    whole = rollout(model, batch, sep, geo, **kw)
    parts = []
    for rows in (Ranks(0, 2).rows(B), Ranks(1, 2).rows(B)):
        torch.manual_seed(11)  # every rank starts from the same state
        parts.append(rollout(model, batch.rows(rows.start, rows.stop), sep, geo, global_rows=rows, **kw))
    for field in ("queries", "counterfactuals", "choices"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field)), field
    torch.testing.assert_close(torch.cat([p.rewards for p in parts]), whole.rewards, atol=1e-5, rtol=0)


def test_an_out_of_memory_chunked_rollout_is_the_whole_rollout(policy):
    """Chunks of one row (the rollout's out-of-memory fallback) draw what the whole batch draws, and leave
    the generator where the whole rollout leaves it."""
    cfg, geo = tiny_config(), head_geometry(policy)
    batch = make_batch(policy, cfg)
    runs = []
    for chunk in (batch.batch_size, 1):
        torch.manual_seed(5)
        traj = rollout_resilient(policy, batch, SEP, geo, FallbackState(chunk, 1, 1), str,
                                 tokens_per_query=cfg.tokens_per_query)
        runs.append((traj, torch.rand(1)))
    (whole, after_whole), (chunked, after_chunked) = runs
    for field in ("queries", "counterfactuals", "choices"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field
    torch.testing.assert_close(chunked.rewards, whole.rewards, atol=1e-5, rtol=0)
    assert torch.equal(after_chunked, after_whole)


def test_a_batch_that_does_not_split_over_the_ranks_is_refused():
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        Ranks(0, 3).rows(4)


# -- whole runs under torchrun ---------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_run_the_one_process_run(one_process, two_processes):
    _same_run(one_process, two_processes)
    # some optimizer step held trajectories of both processes (rows 0-1 are process 0's, 2-3 process 1's)
    chosen = [[t["trajectory"] for t in read_jsonl(two_processes / "trajectories.jsonl")
               if t["episode"] == e and t["selected"]] for e in (1, 2, 3)]
    assert any(min(rows) < 2 <= max(rows) for rows in chosen if rows), chosen
    metrics = read_jsonl(two_processes / "metrics.jsonl")
    assert all(m["tokens_per_second_per_device"] == pytest.approx(m["tokens_per_second"] / 2) for m in metrics)
    assert json.loads((two_processes / "config.json").read_text())["generation_batch_size"] == 4


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_by_one_process(one_process, tmp_path):
    """Launched by `accelerate launch` (torchrun's is the test above), SIGKILLed after its first checkpoint."""
    out = tmp_path / "killed"
    proc = _train(out, ["--num_processes", "2", "--main_process_port", str(_free_port())], via=ACCELERATE)
    wait_for_line(proc, "checkpoint episode-1 written")
    # the launcher and both ranks, as a lost machine would (torchrun puts its ranks in sessions of their own)
    everyone = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in everyone:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(everyone, timeout=60)
    assert len(read_jsonl(out / "metrics.jsonl")) < 3, "killed too late to test anything"
    resume = subprocess.run([sys.executable, "-m", "attnrl_core", "train", "--resume", "--output_dir", str(out),
                             "--no_progress"], capture_output=True, text=True, timeout=600)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "resuming" in resume.stderr and "episode 3/3" in resume.stderr, resume.stderr[-3000:]
    _same_run(one_process, out)


@pytest.mark.slow
def test_two_nodes_meeting_at_a_rendezvous(one_process, tmp_path):
    out, port = tmp_path / "nodes", _free_port()
    nodes = [_train(out, ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
                          "127.0.0.1", "--master_port", str(port)]) for rank in (0, 1)]
    for node in nodes:
        _finish(node)
    _same_run(one_process, out)
