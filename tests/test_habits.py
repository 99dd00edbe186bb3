"""A researcher's habits: their own text as the corpus, trackers, no deprecated calls of ours, runs side by
side that share the cores."""

import json
import os
import warnings

import pytest
import torch

import attnrl_core.host as host
from attnrl_core.config import TrainConfig
from attnrl_core.corpus import is_heldout, iter_wikipedia_articles, longest_article_tokens
from attnrl_core.model import attach_adapter, head_geometry
from attnrl_core.rollout import rollout
from attnrl_core.training import make_optimizer, update_policy

from .conftest import SEP, make_batch, tiny_config, tiny_llama

WORDS = "the river town market bridge museum winter harvest railway council festival library".split()


def _article(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] + ("." if j % 11 == 10 else "") for j in range(words))


@pytest.fixture
def notes_jsonl(tmp_path):
    """A researcher's table with its own column names: one article per line."""
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"doc_id": f"note-{i}", "body": _article(i, 400 + 40 * i)}) + "\n"
                            for i in range(24)))
    return path


def test_a_local_jsonl_is_read_through_its_own_columns(notes_jsonl):
    cfg = TrainConfig.from_preset("embedded", dataset_name=str(notes_jsonl), text_column="body", id_column="doc_id")
    every = list(iter_wikipedia_articles(cfg, split="all", passes=1))
    assert sorted(a["id"] for a in every) == sorted(f"note-{i}" for i in range(24))
    assert all(a["text"].startswith(WORDS[(int(a["id"][5:]) * 7) % len(WORDS)]) for a in every)
    held = {a["id"] for a in iter_wikipedia_articles(cfg, split="eval", passes=1)}
    assert held == {a["id"] for a in every if is_heldout(a["id"], cfg.eval_fraction)}


def test_a_missing_column_is_named(notes_jsonl):
    cfg = TrainConfig.from_preset("embedded", dataset_name=str(notes_jsonl))  # default column "text"
    with pytest.raises(ValueError, match="no column 'text'.*--text_column"):
        next(iter_wikipedia_articles(cfg, split="all", passes=1))


def test_a_folder_of_text_files_is_one_article_per_file(tmp_path):
    for i in range(3):
        (tmp_path / "papers" / f"paper{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "papers" / f"paper{i}.txt").write_text(_article(i, 50))
    cfg = TrainConfig.from_preset("embedded", dataset_name=str(tmp_path / "papers"))
    got = {a["id"]: a for a in iter_wikipedia_articles(cfg, split="all", passes=1)}
    assert sorted(got) == ["paper0.txt", "paper1.txt", "paper2.txt"]
    assert got["paper1.txt"]["title"] == "paper1" and got["paper1.txt"]["text"] == _article(1, 50)


@pytest.mark.slow
def test_training_on_a_local_jsonl(notes_jsonl, tmp_path):
    from attnrl_core.__main__ import main
    from attnrl_core.files import read_jsonl

    out = tmp_path / "run"
    assert main(["train", "--preset", "embedded", "--dataset_name", str(notes_jsonl), "--text_column", "body",
                 "--id_column", "doc_id", "--num_episodes", "1", "--generation_batch_size", "2",
                 "--training_batch_size", "1", "--num_kv_pairs", "3", "--no_progress", "--output_dir", str(out)]) == 0
    ids = {t["article_id"] for t in read_jsonl(out / "trajectories.jsonl")}
    assert ids and all(i.startswith("note-") and not is_heldout(i, 0.1) for i in ids)


def test_the_longest_article_is_known_after_one_cached_scan(smol_tokenizer):
    cfg = TrainConfig.from_preset("embedded")
    longest = longest_article_tokens(cfg, smol_tokenizer)
    assert 10_000 < longest < 100_000  # the sample's long articles, in SmolLM2 tokens
    assert longest_article_tokens(cfg, smol_tokenizer, split="all") >= longest
    assert longest_article_tokens(cfg.replace(dataset_name="wikimedia/wikipedia"), smol_tokenizer) is None


def test_rollout_and_update_make_no_deprecated_call():
    """Our calls into transformers, peft and torch use current names: a FutureWarning or DeprecationWarning
    raised during adapter set-up, a rollout or an update fails here, not in a user's run."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = attach_adapter(tiny_llama(), tiny_config())
        cfg = tiny_config()
        batch = make_batch(model, cfg)
        traj = rollout(model, batch, SEP, head_geometry(model), tokens_per_query=cfg.tokens_per_query)
        update_policy(model, make_optimizer(model, cfg), traj, torch.ones(cfg.generation_batch_size, dtype=torch.bool),
                      training_batch_size=2)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, deprecations


def test_processes_share_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "_registry", lambda: tmp_path)
    monkeypatch.setattr(host, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        with host.sharing_cpu(torch.device("cpu")):
            assert host.share_cpu() == 4  # alone
            (tmp_path / str(os.getppid())).touch()  # another live attnrl process
            (tmp_path / "999999999").touch()  # a dead one's mark: dropped
            assert host.share_cpu() == 2 and torch.get_num_threads() == 2
            assert not (tmp_path / "999999999").exists()
            assert host.share_cpu(requested=3) == 3
        assert not (tmp_path / str(os.getpid())).exists()  # unregistered on exit
        with host.sharing_cpu(torch.device("cuda")):  # a GPU run leaves the CPU to others
            assert not (tmp_path / str(os.getpid())).exists()
    finally:
        torch.set_num_threads(before)
