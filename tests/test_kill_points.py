"""A run killed at any moment — loading the model, rolling out, updating, writing a checkpoint, its config
or a log line — and resumed (as often as it takes) ends with an uninterrupted run's adapter."""

import pytest

from attnrl_core.files import read_jsonl

from .killpoints import RUN, final_adapter, max_difference, run_child

pytestmark = pytest.mark.slow  # whole runs of the real model

SCENARIOS = {  # the kill of each launch in turn; the last launch resumes without one
    "torn log line": [("write:metrics.jsonl", 3)],
    "checkpoint write": [("write:state.json", 2)],
    "rollout, then config write on resume": [("rollout", 3), ("write:config.json", 1)],
    "update, then model load on resume": [("update", 1), ("load", 1)],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-ref") / "run"
    assert run_child(None, 0, ["train", *RUN, "--output_dir", str(out)]) == 0
    return out


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(scenario, reference, tmp_path):
    out = tmp_path / "run"
    for i, (point, count) in enumerate(SCENARIOS[scenario]):
        args = ["train", *RUN, "--output_dir", str(out)] if i == 0 else \
            ["train", "--resume", "--output_dir", str(out), "--no_progress"]
        assert run_child(point, count, args) == -9, f"launch {i + 1} was not killed at {point}"
    assert run_child(None, 0, ["train", "--resume", "--output_dir", str(out), "--no_progress"]) == 0
    assert max_difference(final_adapter(reference, 4), final_adapter(out, 4)) <= 1e-6
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["episode"] for m in metrics] == [1, 2, 3, 4]
    assert [m["reward"] for m in metrics] == [m["reward"] for m in read_jsonl(reference / "metrics.jsonl")]
    assert len(read_jsonl(out / "trajectories.jsonl")) == 4 * 2
