"""A few real episodes on the embedded default (SmolLM2-135M + the packaged Wikipedia sample)."""

import json

import pytest

from attnrl_core.__main__ import main
from attnrl_core.files import read_jsonl
from attnrl_core.rundir import METRICS

pytestmark = pytest.mark.slow  # whole runs of the real model

# Short chunks (8 + 8 tokens, 6-token queries): what is checked is the whole loop and its files, not the sizes.
ARGS = ["--preset", "embedded", "--num_episodes", "3", "--generation_batch_size", "4", "--training_batch_size", "2",
        "--num_kv_pairs", "4", "--warmup_trajectories", "4", "--filter_num_sd", "0", "--checkpoint_every", "2",
        "--learning_rate", "1e-3", "--report_to", "tensorboard", "--no_progress",
        "--tokens_per_key", "8", "--tokens_per_value", "8", "--tokens_per_query", "6"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "e2e"
    assert main(["train", *ARGS, "--output_dir", str(out)]) == 0
    return out


def test_run_directory_contents(run_dir):
    for name in ("config.json", "metrics.jsonl", "trajectories.jsonl", "figures/reward_curve.png",
                 "figures/training_panels.png", "figures/similarity_distribution.png"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["episode-2", "episode-3"]
    assert json.loads((run_dir / "config.json").read_text())["num_episodes"] == 3


def test_metrics_and_trajectories(run_dir):
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["episode"] for m in metrics] == [1, 2, 3]
    assert set(METRICS) <= set(metrics[0])
    assert metrics[0]["selected"] == 0 and metrics[0]["loss"] is None  # warm-up
    assert sum(m["selected"] for m in metrics) > 0  # the filter fired and the policy was updated
    trajs = read_jsonl(run_dir / "trajectories.jsonl")
    assert len(trajs) == 12 and all(len(t["steps"]) == 1 for t in trajs)
    assert all(isinstance(s["query"], str) and s["pair"] in t["pool"] for t in trajs for s in t["steps"])


def test_checkpoint_is_a_loadable_peft_adapter_that_moved(run_dir):
    from peft import PeftModel

    from attnrl_core.config import TrainConfig
    from attnrl_core.model import load_base_model

    ckpt = run_dir / "checkpoints" / "episode-3"
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "state.json",
            "manifest.json"} <= {p.name for p in ckpt.iterdir()}
    model = PeftModel.from_pretrained(load_base_model(TrainConfig.from_preset("embedded")), ckpt)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # LoRA B starts at 0: nonzero means it trained


def test_existing_run_is_refused_and_untouched(run_dir, capsys):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    assert main(["train", *ARGS, "--output_dir", str(run_dir)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_metrics_reach_tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("reward")]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([m["reward"] for m in metrics], rel=1e-6)
    # every metric with a value goes there (a pool of one pair leaves the selection diagnostics undefined: null)
    numeric = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"query_distinct", "kl", "tokens_per_second", "adapter_reward"} <= numeric
    assert numeric <= set(events.Tags()["scalars"]), numeric - set(events.Tags()["scalars"])


def test_no_earlier_rollouts_kept_logits_are_alive_when_a_rollout_starts(tmp_path, monkeypatch):
    """The real `train` over 3 episodes: when each rollout starts, no earlier rollout's kept sampling logits (the
    previous policy of its update, [B, P*Tq, V]) are still referenced. Holding them doubled that buffer at every
    rollout's peak from episode 2 on (issue 38)."""
    import gc
    import weakref

    import attnrl_core.run as run_module

    kept, alive_at_start, real = [], [], run_module.rollout_resilient

    def watched(*args, **kwargs):
        gc.collect()
        alive_at_start.append(sum(ref() is not None for ref in kept))
        traj = real(*args, **kwargs)
        kept.append(weakref.ref(traj.query_logits))
        return traj

    monkeypatch.setattr(run_module, "rollout_resilient", watched)
    assert main(["train", *ARGS, "--output_dir", str(tmp_path / "run")]) == 0
    assert alive_at_start == [0, 0, 0]
