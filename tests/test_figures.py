"""What notebooks and the console show a reader: figures readable at page width, paths from the repository
root, warm-up said in words, and the texts behind notebook 02's checks. No model is loaded here."""

import logging

import matplotlib
import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
import pytest
import torch

from attnrl_core import viz
from attnrl_core.config import TrainConfig, project_path
from attnrl_core.data import retokenisation_drift
from attnrl_core.evaluate import power_note
from attnrl_core.filtering import warmup_episodes, warmup_message
from attnrl_core.rundir import METRICS, run_summary
from attnrl_core.run import _report

matplotlib.use("Agg")


def _metrics(episodes: int, warmup_until: int, batch: int = 8) -> list[dict]:
    """Synthetic metrics.jsonl rows: no threshold (and no update) up to `warmup_until`."""
    rows = []
    for e in range(1, episodes + 1):
        warm = e <= warmup_until
        row = {k: None for k in METRICS}
        row.update(episode=e, reward=0.01 * e, reward_std=0.1, running_mean=0.0, running_std=0.1,
                   threshold=None if warm else 0.1, selected=0 if warm else 2,
                   filter_fraction=0.0 if warm else 2 / batch, seconds=5.0, tokens_per_second=900.0,
                   loss=None if warm else 0.5, policy_loss=None if warm else 0.4, kl=None if warm else 1e-3,
                   grad_norm=None if warm else 0.2, selection_entropy=0.99, selection_top_ratio=1.1,
                   key_cosine=0.5, query_distinct=0.9, adapter_reward=0.0, query_reward=0.01)
        rows.append(row)
    return rows


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_training_panels_read_at_page_width():
    fig = viz.plot_training_panels(_metrics(3, 1))
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(axes) == len(viz.TRAINING_PANELS)
    columns = len({round(ax.get_position().x0, 3) for ax in axes})
    assert columns <= 4 and fig.get_figwidth() <= 12
    titles = {ax.get_title() for ax in axes}
    assert not titles & set(viz.TRAINING_PANELS)  # words, not raw metric names
    assert all(ax.get_ylabel() for ax in axes)  # every panel names its unit
    for ax in axes:  # whole episodes only, however short the run
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_a_run_in_warmup_says_so_in_the_panels_and_the_summary():
    cfg = TrainConfig.from_preset("embedded", num_episodes=3)
    fig = viz.plot_training_panels(_metrics(1, 1))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("warm-up" in t for t in texts)
    summary = run_summary(cfg, _metrics(1, 1))
    assert "warm-up: 8 of 15 trajectories seen, nothing selected yet" in summary and "episodes 1 of 3" in summary
    done = run_summary(cfg, _metrics(3, 2))
    assert "warm-up" not in done and "2 trajectories selected" in done


def test_warmup_counts():
    assert warmup_episodes(15, 8) == 2 and warmup_episodes(8, 8) == 1 and warmup_episodes(0, 8) == 1
    assert warmup_episodes(15, 8, seen=16) == 0
    assert warmup_message(8, 15) == "warm-up: 8 of 15 trajectories seen, nothing selected yet"
    assert warmup_message(16, 15).endswith("selection starts next episode")


def test_the_console_line_says_warmup(caplog):
    class Bar:
        def set_postfix(self, **kw):
            self.postfix = kw

    cfg = TrainConfig.from_preset("embedded", num_episodes=1)
    metrics = _metrics(1, 1)[0]
    with caplog.at_level(logging.INFO, logger="attnrl"):
        _report(Bar(), metrics, cfg, None, seen=8)
    assert "warm-up: 8 of 15 trajectories seen, nothing selected yet" in caplog.text
    assert "selected 0" not in caplog.text


def test_one_head_is_labelled_by_its_number_on_a_fixed_scale():
    probs = torch.softmax(torch.randn(9, 8), dim=-1).numpy()
    fig = viz.plot_head_heatmaps([(probs, "a"), (probs * 0 + 1 / 8, "b")], [f"k{i}" for i in range(8)], heads=[3])
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["head 3", "mean of all"]
    assert (images[0].get_array()[0] == probs[3]).all() and (images[0].get_array()[1] == probs.mean(0)).all()
    assert all((im.norm.vmin, im.norm.vmax) == (0.0, 1.0) for im in images)  # the same scale on every map


def test_integer_episode_ticks_on_the_reward_curve():
    fig = viz.plot_reward_curve(_metrics(3, 1))
    assert all(float(t).is_integer() for t in fig.axes[0].get_xticks())


def test_length_histogram_shows_the_thresholds_on_a_log_axis():
    fig = viz.plot_length_histogram([50, 300, 900, 4000, 20000], {"a": 160, "b": 1280})
    assert fig.axes[0].get_xscale() == "log"


def test_paths_resolve_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a kernel in notebooks/, papermill anywhere
    root = project_path()
    assert (root / "pyproject.toml").is_file()
    assert project_path("runs/demo") == root / "runs" / "demo"
    assert project_path(str(tmp_path / "x")) == tmp_path / "x"  # absolute stays


def test_config_prints_one_field_a_line():
    text = TrainConfig.from_preset("embedded", warmup_trajectories=8).describe()
    lines = text.splitlines()
    assert len(lines) == len(TrainConfig.__dataclass_fields__)
    assert any(line.startswith("* warmup_trajectories") for line in lines)
    assert not any(line.startswith("* num_kv_pairs") for line in lines)  # the preset's own value is no change


def test_retokenisation_drift_finds_a_blank_line_cut_at_a_chunk_end(smol_tokenizer):
    ids = smol_tokenizer("one guide.\n\nNow", add_special_tokens=False)["input_ids"]
    newline = [smol_tokenizer.decode([i]) for i in ids].index("\n")
    chunk = newline + 2  # the chunk ends after the second of the two newline tokens of running text
    drift = retokenisation_drift(torch.tensor(ids), smol_tokenizer, chunk)
    assert len(drift) == 1 and drift[0]["start"] == 0 and len(drift[0]["again"]) == chunk - 1


@pytest.mark.parametrize("articles,mde,says", [
    (3, 0.05, "too few articles for the intervals above to mean anything"),  # a t over 3 articles: 2 df
    (3, None, "no spread to size an interval from"),  # trained and random chose alike: not "2 articles suffice"
    (20, 0.031, "smaller than about 0.031 can go undetected"),
])
def test_the_power_note_says_when_intervals_mean_nothing(articles, mde, says):
    report = {"articles": articles, "samples_per_article": 2,
              "power": {"minimum_detectable_effect": mde, "articles_needed": {"0.01": 180, "0.02": 46}}}
    assert says in power_note(report)
    # from 3 articles no article count is printed (a demo once read "4296 or more articles")
    assert ("0.02 needs about 46 articles" in power_note(report)) is (articles >= 10 and mde is not None)


def test_evaluation_figure_keeps_each_method_visible_and_its_colour():
    """Issue 40: methods with identical curves were drawn on top of each other, and green meant "reward" in one
    panel and "chosen" in the next. Now every method has one colour in every panel and equal curves sit side by
    side."""
    same = {"logprob_per_step": [-3.0, -2.5, -2.0]}
    report = {"checkpoint": "episode-2", "units": 4, "articles": 2, "samples_per_article": 1,
              "methods": {m: dict(same) for m in ("trained", "untrained", "random", "natural")},
              "paired": {f"trained-{m}": {"mean": 0.0, "ci": [-0.1, 0.1], "logprob": {"mean": 0.0, "ci": [-0.1, 0.1]}}
                         for m in ("untrained", "random", "natural")},
              "oracle": {"mean": 0.0, "chosen": 0.01, "best": 0.2, "fraction": 0.05, "ci": [-0.5, 0.6]}}
    fig = viz.plot_evaluation(report)
    lines = {line.get_label(): line for line in fig.axes[2].get_lines()}
    xs = [tuple(lines[m].get_xdata()) for m in viz.METHOD_STYLE]
    assert len(set(xs)) == 4  # equal values, four visible curves
    bars = fig.axes[1].patches
    for bar, method in zip(bars[:2], ("random", "trained")):
        assert mcolors.same_color(bar.get_facecolor(), lines[method].get_color())
    plt.close(fig)
