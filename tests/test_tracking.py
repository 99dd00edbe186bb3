"""--report_to parsing (independent of what is installed) and an offline TensorBoard round trip."""

from __future__ import annotations

import pytest

from attnrl_core import tracking
from attnrl_core.tracking import Trackers, parse_report_to


@pytest.fixture
def all_installed(monkeypatch):
    monkeypatch.setattr(tracking, "_installed", lambda module: True)


@pytest.mark.parametrize("value", ["none", "", "  NONE ", " , "])
def test_none_means_no_trackers(value):
    assert parse_report_to(value) == []


def test_names_are_split_stripped_lowered_and_deduplicated(all_installed):
    assert parse_report_to("tensorboard") == ["tensorboard"]
    assert parse_report_to(" TensorBoard , wandb,tensorboard,") == ["tensorboard", "wandb"]
    assert parse_report_to("trackio,wandb,tensorboard") == ["trackio", "wandb", "tensorboard"]


def test_missing_package_is_a_one_line_error_with_the_fix(monkeypatch):
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else object())
    with pytest.raises(ValueError) as err:
        parse_report_to("tensorboard,wandb")
    msg = str(err.value)
    assert "\n" not in msg and "wandb package" in msg
    assert "pip install -e '.[tracking]'" in msg and "pip install wandb" in msg


def test_unknown_tracker_refused(all_installed):
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow': must be none or a comma-separated list"):
        parse_report_to("tensorboard,mlflow")


def test_none_mixed_with_trackers_refused(all_installed):
    with pytest.raises(ValueError, match="none"):
        parse_report_to("none,tensorboard")


def test_no_trackers_is_a_no_op(tmp_path):
    with Trackers([], tmp_path, {"lr": 1e-4}) as t:
        t.log({"reward": 1.0}, step=1)
    t.close()
    assert list(tmp_path.iterdir()) == []


def _accumulator(log_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return acc


def test_tensorboard_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    config = {"learning_rate": 1e-4, "preset": "embedded", "lora_target_modules": ["q_proj", "v_proj"]}
    rewards = {1: 0.125, 2: -0.3, 3: 1.7}
    with Trackers(["tensorboard"], tmp_path, config) as t:
        for step, r in rewards.items():
            t.log({"reward": r, "kl": None, "selected": 2, "title": "x", "grad_norm": float("nan")}, step=step)
    t.close()  # idempotent

    acc = _accumulator(tmp_path / "tensorboard")
    scalars = acc.Tags()["scalars"]
    assert "kl" not in scalars and "title" not in scalars and "grad_norm" not in scalars
    got = {e.step: e.value for e in acc.Scalars("reward")}
    assert got == pytest.approx(rewards, rel=1e-6)
    assert [e.value for e in acc.Scalars("selected")] == [2, 2, 2]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"preset": "embedded"' in text and '"learning_rate": 0.0001' in text


def test_tensorboard_resume_appends_and_purges_the_interrupted_tail(tmp_path):
    pytest.importorskip("tensorboard")
    with Trackers(["tensorboard"], tmp_path, {}) as t:
        for step in (1, 2, 3):
            t.log({"reward": float(step)}, step=step)
    # The checkpoint was at episode 2: the resumed run logs from step 3 again.
    with Trackers(["tensorboard"], tmp_path, {}, resume=True, first_step=3) as t:
        for step in (3, 4):
            t.log({"reward": 10.0 * step}, step=step)
    acc = _accumulator(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("reward")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
