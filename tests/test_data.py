import itertools

import pytest
import torch

from attnrl_core.assets import clean_wikitext, embedded_dataset_file
from attnrl_core.config import TrainConfig
from attnrl_core.corpus import DataPosition, iter_wikipedia_articles
from attnrl_core.data import (QUERY_SEPARATOR, RESPONSE_SEPARATOR, encode_separators, iter_key_value_batches,
                              sample_chunks, split_key_values, tokenize_articles)
from attnrl_core.rollout import initial_context


# -- pure tensor functions ----------------------------------------------------------------------------
def test_split_key_values_is_contiguous_and_non_overlapping():
    N, Tk, Tv = 4, 3, 2
    tokens = torch.arange(2 * N * (Tk + Tv)).view(2, -1)
    keys, values = split_key_values(tokens, N, Tk, Tv)
    assert keys.shape == (2, N, Tk) and values.shape == (2, N, Tv)
    # interleaving key_i, value_i for i = 0..N-1 gives back the article exactly
    rebuilt = torch.cat([torch.cat([keys[:, i], values[:, i]], dim=1) for i in range(N)], dim=1)
    assert torch.equal(rebuilt, tokens)
    assert keys.data_ptr() == tokens.data_ptr()  # a view, not a copy


def test_split_key_values_rejects_wrong_length():
    with pytest.raises(AssertionError):
        split_key_values(torch.zeros(2, 39, dtype=torch.long), 2, 10, 10)


def test_sample_chunks_excludes_example_and_repeats():
    pool = sample_chunks(64, 10, 3, torch.Generator().manual_seed(0))
    assert pool.shape == (64, 3)
    assert pool.min() >= 1 and pool.max() <= 9
    assert all(len(set(row.tolist())) == 3 for row in pool)
    assert len({tuple(r) for r in pool.tolist()}) > 10  # random subsets, not one fixed subset


# -- articles ---------------------------------------------------------------------------------------------
def test_clean_wikitext_removes_markup():
    raw = ("'''Bold''' text with a [[Link|label]] and {{cite web|x=1}}<ref>note</ref>.\n"
           "==History==\n''Italic'' more.\n{| class=wikitable\n| cell\n|}\n")
    text = clean_wikitext(raw)
    for junk in ("'''", "''", "[[", "]]", "{{", "}}", "<ref", "==", "|"):
        assert junk not in text
    assert "Bold text with a label" in text and "History" in text and "Italic more." in text


def test_embedded_dataset_has_hub_columns_and_clean_text():
    import pyarrow.parquet as pq

    table = pq.read_table(embedded_dataset_file())
    assert table.column_names == ["id", "url", "title", "text"]
    rows = table.to_pylist()
    assert len(rows) >= 100
    for row in rows:
        assert not row["text"].lower().startswith("#redirect")
        for junk in ("'''", "[[", "{{", "<ref"):
            assert junk not in row["text"], (row["title"], junk)


def test_iter_wikipedia_articles_cycles_and_tracks_position():
    cfg = TrainConfig.from_preset("embedded")
    position = DataPosition()
    articles = list(itertools.islice(iter_wikipedia_articles(cfg, position=position, split="all"), 110))
    assert position.epoch == 1 and position.index == 110 - 106
    resumed = list(itertools.islice(iter_wikipedia_articles(cfg, start=DataPosition(0, 50), split="all"), 60))
    assert [a["id"] for a in resumed] == [a["id"] for a in articles[50:110]]


def test_train_split_resumes_exactly_from_a_position():
    """Positions count every article of the stream, so a filtered stream resumes where it stopped."""
    cfg = TrainConfig.from_preset("embedded")
    position = DataPosition()
    stream = iter_wikipedia_articles(cfg, position=position)
    list(itertools.islice(stream, 90))
    saved = DataPosition(position.epoch, position.index)
    rest = [a["id"] for a in itertools.islice(stream, 40)]
    again = [a["id"] for a in itertools.islice(iter_wikipedia_articles(cfg, start=saved), 40)]
    assert saved.epoch == 0 and rest == again


class _CharTokenizer:
    """One token per character: enough to test filtering without a real vocabulary."""

    def __call__(self, texts, add_special_tokens=False, truncation=True, max_length=None):
        return {"input_ids": [[ord(c) for c in t][:max_length] for t in texts]}


def test_token_filter_keeps_long_articles_and_truncates():
    arts = [{"text": "a" * n, "id": n} for n in (5, 12, 30, 11)]
    out = list(tokenize_articles(arts, _CharTokenizer(), min_tokens=12, max_scan=10))
    assert [a["id"] for a, _ in out] == [12, 30]
    assert all(t.shape == (12,) for _, t in out)


def test_token_filter_gives_up_after_bounded_scan():
    shorts = ({"text": "ab", "id": i} for i in itertools.count())  # an endless stream of short articles
    with pytest.raises(ValueError, match="none of 50 consecutive articles"):
        list(tokenize_articles(shorts, _CharTokenizer(), min_tokens=100, max_scan=50))


def test_pipeline_error_when_no_article_is_long_enough():
    cfg = TrainConfig.from_preset("embedded", num_kv_pairs=50_000, max_scan_articles=200)
    with pytest.raises(ValueError, match="lower num_kv_pairs"):
        next(iter_key_value_batches(cfg, _CharTokenizer(), None))


# -- tokenization consistency with the real SmolLM2 tokenizer -----------------------------------------
def test_separator_ids(smol_tokenizer):
    sep = encode_separators(smol_tokenizer)
    assert smol_tokenizer.decode(sep.query) == QUERY_SEPARATOR
    assert smol_tokenizer.decode(sep.response) == RESPONSE_SEPARATOR
    assert sep.query.tolist() == [32351, 42] and sep.response.tolist() == [14212, 42]  # " Query", ":" ...
    space = smol_tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert space[-1] not in sep.query.tolist() + sep.response.tolist()  # no lone trailing-space token
    assert sep.bos.tolist() == [smol_tokenizer.bos_token_id]


def test_real_pipeline_batch_shapes_and_contiguity(smol_tokenizer):
    cfg = TrainConfig.from_preset("embedded", generation_batch_size=3, training_batch_size=2)
    batch = next(iter_key_value_batches(cfg, smol_tokenizer, None))
    N, Tk, Tv = cfg.num_kv_pairs, cfg.tokens_per_key, cfg.tokens_per_value
    assert batch.key_tokens.shape == (3, N, Tk) and batch.value_tokens.shape == (3, N, Tv)
    assert batch.pool.shape == (3, cfg.pool_size)
    article = next(a for a in iter_wikipedia_articles(cfg) if a["id"] == batch.article_ids[0])
    ids = smol_tokenizer(article["text"], add_special_tokens=False)["input_ids"]
    pairs = torch.cat([torch.cat([batch.key_tokens[0, i], batch.value_tokens[0, i]]) for i in range(N)])
    assert pairs.tolist() == ids[: N * (Tk + Tv)]  # keys and values tile the article's start exactly


def test_spacing_rule_matches_running_text(smol_tokenizer):
    """` Query:` + chunk ids equals tokenising the text whole when the chunk brings its own space."""
    sep = encode_separators(smol_tokenizer)
    for chunk in (" the cat sat on the mat", " 1921 was a year", " Anarchism is a political philosophy"):
        ids = smol_tokenizer(chunk, add_special_tokens=False)["input_ids"]
        whole = smol_tokenizer(QUERY_SEPARATOR + chunk + RESPONSE_SEPARATOR + chunk,
                               add_special_tokens=False)["input_ids"]
        assert sep.query.tolist() + ids + sep.response.tolist() + ids == whole


def test_built_context_round_trips(smol_tokenizer):
    cfg = TrainConfig.from_preset("embedded", generation_batch_size=2, training_batch_size=2)
    batch = next(iter_key_value_batches(cfg, smol_tokenizer, None))
    sep = encode_separators(smol_tokenizer)
    ctx = initial_context(batch, sep, torch.device("cpu"))
    assert ctx.shape == (2, 1 + len(sep.query) + cfg.tokens_per_key + len(sep.response) + cfg.tokens_per_value)
    text = smol_tokenizer.decode(ctx[0, 1:])
    key, value = smol_tokenizer.decode(batch.key_tokens[0, 0]), smol_tokenizer.decode(batch.value_tokens[0, 0])
    assert text == QUERY_SEPARATOR + key + RESPONSE_SEPARATOR + value
    # decode -> encode gives the same ids for separators (chunks may merge across a cut word; ids are
    # never re-derived from text, which is why sequences are built by concatenating ids)
    assert smol_tokenizer(QUERY_SEPARATOR, add_special_tokens=False)["input_ids"] == ctx[0, 1:3].tolist()


def test_unshuffled_stream_resumes_from_datasets_state(monkeypatch):
    """A Hub-style (unshuffled) stream — here a local folder read by the Hub path, which a local corpus
    would not take (it is reshuffled every pass) — resumes from `datasets`' own state at the shard offset,
    not by skipping."""
    from pathlib import Path

    import attnrl_core.corpus as corpus

    monkeypatch.setattr(corpus, "is_local_corpus", lambda cfg: False)
    cfg = TrainConfig.from_preset("embedded", dataset_name=str(Path(embedded_dataset_file()).parent))
    position = DataPosition()
    stream = iter_wikipedia_articles(cfg, position=position)
    list(itertools.islice(stream, 50))
    saved = DataPosition(**vars(position))
    assert saved.stream_state is not None
    rest = [a["id"] for a in itertools.islice(stream, 20)]
    again = [a["id"] for a in itertools.islice(iter_wikipedia_articles(cfg, start=saved), 20)]
    assert rest == again
