"""Articles from a corpus: the Hub's Wikipedia streamed, the embedded sample, or a local file or folder.

Every corpus is read through `datasets` streaming as rows of `id, title, text`; a local one is finite,
read pass after pass and reshuffled each pass. The held-out split is a hash of the article id. A
`DataPosition` says where a stream is, so a checkpoint resumes it exactly. Imports attnrl_core.assets,
.config and .files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
from datasets import IterableDataset, load_dataset

from .assets import cache_dir, embedded_dataset_file
from .config import EMBEDDED_DATASET, TrainConfig
from .files import atomic_write_text

log = logging.getLogger("attnrl")


@dataclass
class DataPosition:
    """Where the article stream is (for checkpoints): pass number, articles consumed in it, and for
    unshuffled (Hub) streams `datasets`' own state, which resumes at the shard offset instead of
    re-reading every article before it."""

    epoch: int = 0
    index: int = 0
    stream_state: dict | None = None


LOCAL_TABLES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}  # suffix -> datasets builder
TEXT_SUFFIXES = (".txt", ".md")


def is_local_corpus(cfg: TrainConfig) -> bool:
    """A finite corpus on this machine (the embedded sample, or a file or folder): read pass after pass,
    reshuffled each pass."""
    return cfg.dataset_name == EMBEDDED_DATASET or Path(cfg.dataset_name).exists()


def _read_parquet_rows(path: str):
    # The whole (small) table at once: no Arrow reader is left open between rows. `datasets`' parquet
    # builder sleeps 5 s each time a stream over it ends or is dropped (its guard for apache/arrow#45214),
    # which every pass, every evaluation and every test paid; the rows and their shuffled order are the same.
    yield from pq.read_table(path).to_pylist()


def _read_text_files(files: list[str], root: str):
    for name in files:
        path = Path(name)
        yield {"id": str(path.relative_to(root)), "title": path.stem, "text": path.read_text(errors="replace")}


def _local_stream(cfg: TrainConfig):
    """A local file or folder as an IterableDataset of `id, title, text`: tables (parquet, jsonl) through
    `datasets`' builders with their columns renamed, plain-text files one article each (id = path)."""
    path = Path(cfg.dataset_name)
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    tables = [f for f in files if f.suffix in LOCAL_TABLES]
    if tables:
        builders = {LOCAL_TABLES[f.suffix] for f in tables}
        if len(builders) > 1:
            raise ValueError(f"{path} mixes parquet and JSON files: keep one format per folder")
        ds = load_dataset(builders.pop(), data_files={"train": [str(f) for f in tables]}, split="train", streaming=True)
        text, ident = cfg.text_column, cfg.id_column

        def standard(row: dict) -> dict:
            missing = [c for c in (text, ident) if c not in row]
            if missing:
                raise ValueError(f"{path} has no column {missing[0]!r} (it has {sorted(row)}): pass --text_column / "
                                 "--id_column with the names it uses")
            return {"id": str(row[ident]), "title": str(row.get("title", row[ident])), "text": str(row[text])}

        return ds.map(standard)
    texts = [str(f) for f in files if f.suffix in TEXT_SUFFIXES]
    if not texts:
        raise ValueError(f"{path} holds no parquet, jsonl or text ({', '.join(TEXT_SUFFIXES)}) files")
    root = str(path.parent if path.is_file() else path)
    return IterableDataset.from_generator(_read_text_files, gen_kwargs={"files": texts, "root": root})


def load_article_stream(cfg: TrainConfig, epoch: int = 0):
    """A `datasets` IterableDataset of articles (`id, title, text`, and `url` from the Hub), shuffled per pass
    when the corpus is local."""
    if cfg.dataset_name == EMBEDDED_DATASET:
        ds = IterableDataset.from_generator(_read_parquet_rows, gen_kwargs={"path": str(embedded_dataset_file())})
    elif is_local_corpus(cfg):
        ds = _local_stream(cfg)
    else:
        try:
            return load_dataset(cfg.dataset_name, cfg.dataset_config or None, split=cfg.dataset_split, streaming=True)
        except Exception as e:  # noqa: BLE001 - not found, offline, gated, bad config: one message, with the fix
            first = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"dataset {cfg.dataset_name!r} ({cfg.dataset_config or 'no config'}, split "
                             f"{cfg.dataset_split!r}) cannot be loaded ({type(e).__name__}: {first}): check the name, "
                             "log in with `hf auth login`, set HF_HUB_OFFLINE=1 with it cached, or use --preset embedded") from None
    # A local corpus is small and read many times: a fresh order every pass, reproducible by seed.
    return ds.shuffle(seed=cfg.seed + epoch, buffer_size=1024)


def longest_article_tokens(cfg: TrainConfig, tokenizer, split: str = "train") -> int | None:
    """Tokens in the longest article of `split` of a local corpus (None for a streamed one, which cannot be
    scanned whole). One scan, cached per corpus and tokenizer under the asset cache, shows its progress."""
    if not is_local_corpus(cfg):
        return None
    source = str(embedded_dataset_file()) if cfg.dataset_name == EMBEDDED_DATASET else str(Path(cfg.dataset_name).resolve())
    stat = Path(source).stat()
    key = f"{source}|{stat.st_mtime_ns}|{stat.st_size}|{cfg.text_column}|{tokenizer.name_or_path}|{len(tokenizer)}"
    cache_file = cache_dir() / "article-lengths.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key not in cached:
        lengths = []
        articles = iter_wikipedia_articles(cfg.replace(eval_fraction=0.0), split="all", passes=1)
        for chunk in iter(lambda: list(itertools.islice(articles, 64)), []):
            ids = tokenizer([a["text"] for a in chunk], add_special_tokens=False)["input_ids"]
            lengths += [[str(a["id"]), len(t)] for a, t in zip(chunk, ids)]
            log.info("scanned %d articles of %s for their lengths (once; cached)", len(lengths), cfg.dataset_name)
        cached[key] = lengths
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cached))
    keep = (lambda i: True) if split == "all" else (lambda i: is_heldout(i, cfg.eval_fraction) == (split == "eval"))
    return max((n for i, n in cached[key] if keep(i)), default=0)


def is_heldout(article_id, fraction: float) -> bool:
    """The deterministic evaluation split: a hash of the article id, the same on every machine and run."""
    digest = hashlib.sha256(str(article_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def iter_heldout_articles(cfg: TrainConfig) -> Iterator[dict]:
    """The held-out split in an order that depends only on the corpus and `eval_fraction`, never on the
    training seed, so runs of every seed are scored on the same articles: a local corpus (which training
    reshuffles by seed) ordered by the SHA-256 of the article id; the Hub's stream, which is never
    shuffled, in its own order."""
    articles = iter_wikipedia_articles(cfg, split="eval", passes=1)
    if is_local_corpus(cfg):
        yield from sorted(articles, key=lambda a: hashlib.sha256(f"order:{a['id']}".encode()).digest())
    else:
        yield from articles


def iter_wikipedia_articles(cfg: TrainConfig, start: DataPosition | None = None,
                            position: DataPosition | None = None, split: str = "train",
                            passes: int | None = None) -> Iterator[dict]:
    """Articles of one split ("train", "eval" or "all"), pass after pass over the stream (the Hub's is
    long enough to be one pass); `passes` limits the number of passes.

    `position`, when given, is updated in place so a checkpoint can record where the stream is;
    `start` resumes from a recorded position. Positions count every article of the stream, whatever
    its split, so they stay valid for `skip`.
    """
    assert split in ("train", "eval", "all"), split
    keep = (lambda a: True) if split == "all" else (
        lambda a: is_heldout(a["id"], cfg.eval_fraction) == (split == "eval"))
    position = position if position is not None else DataPosition()
    start = start or DataPosition()
    position.epoch, position.index = start.epoch, start.index
    # A local corpus is reshuffled every pass; a shuffle buffer is not in `state_dict`, so that stream
    # resumes by skipping (cheap: it is small). Hub streams resume from their state.
    shuffled = is_local_corpus(cfg)
    while True:
        stream = load_article_stream(cfg, position.epoch)
        if start.stream_state is not None and not shuffled and position.epoch == start.epoch:
            stream.load_state_dict(start.stream_state)
        elif position.index:
            stream = stream.skip(position.index)
        seen = 0
        for article in stream:
            position.index += 1
            if not shuffled:
                position.stream_state = stream.state_dict()
            if keep(article):
                seen += 1
                yield article
        if seen == 0 and position.index == 0:
            raise ValueError(f"dataset {cfg.dataset_name!r} yielded no {split} articles: check dataset_name/config/"
                             "split and eval_fraction")
        position.epoch, position.index, position.stream_state = position.epoch + 1, 0, None
        if passes is not None and position.epoch - start.epoch >= passes:
            return
