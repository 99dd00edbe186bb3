"""Functional, iterator-based data loading: articles -> token tensors -> key/value pair batches.

SPEC.md §4.2/§4.4 as settled by DESIGN.md §2.3-2.4. Each article is tokenised once
(`add_special_tokens=False`, truncated to the tokens needed), cut by index arithmetic into
`num_kv_pairs` contiguous, non-overlapping (key, value) chunks, and batched into fixed-shape tensors.
No padding anywhere; text is kept only for logging. Articles come from `corpus`. Imports
attnrl_core.config and .corpus.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .corpus import DataPosition, is_local_corpus, iter_heldout_articles, iter_wikipedia_articles

QUERY_SEPARATOR = " Query:"
RESPONSE_SEPARATOR = " Response:"


# -- separators -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Separators:
    """Token ids of the prompt format, encoded once (DESIGN.md §2.4).

    ` Query:` and ` Response:` carry their leading space and no trailing space token: the chunk or
    query that follows brings its own leading space, as the tokenizer would produce in running text.
    """

    query: torch.Tensor  # [Sq]
    response: torch.Tensor  # [Sr]
    bos: torch.Tensor  # [0] or [1]


def encode_separators(tokenizer) -> Separators:
    def enc(text: str) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or tokenizer.decode(ids) != text:
            raise ValueError(f"the separator {text!r} does not round-trip through the tokenizer "
                             f"{type(tokenizer).__name__}: use a tokenizer that encodes it losslessly")
        return torch.tensor(ids, dtype=torch.long)

    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return Separators(enc(QUERY_SEPARATOR), enc(RESPONSE_SEPARATOR), torch.tensor(bos, dtype=torch.long))


def tokenize_articles(articles: Iterable[dict], tokenizer, min_tokens: int, max_scan: int,
                      batch_size: int = 32, max_tokens: int | None = None) -> Iterator[tuple[dict, torch.Tensor]]:
    """(article, ids [min_tokens..max_tokens]) for articles with at least `min_tokens` tokens, tokenised once
    each and truncated at `max_tokens` (default `min_tokens`: exactly that many).

    Gives up with a clear error after `max_scan` consecutive articles that are too short, so a stream
    that never yields a long-enough article ends instead of hanging.
    """
    rejected, bar = 0, None
    it = iter(articles)
    while chunk := list(itertools.islice(it, batch_size)):
        ids = tokenizer([a["text"] for a in chunk], add_special_tokens=False, truncation=True,
                        max_length=max_tokens or min_tokens)["input_ids"]
        for article, tokens in zip(chunk, ids):
            if len(tokens) < min_tokens:
                rejected += 1
                if rejected == 200:  # a long search: show it rather than wait silently
                    bar = tqdm(total=max_scan, initial=rejected, desc=f"looking for an article of {min_tokens} tokens")
                elif bar is not None:
                    bar.update()
                if rejected >= max_scan:
                    raise ValueError(
                        f"none of {rejected} consecutive articles has the {min_tokens} tokens needed "
                        f"(num_kv_pairs x (tokens_per_key + tokens_per_value)): lower num_kv_pairs or the token counts")
                continue
            if bar is not None:
                bar.close()
                bar = None
            rejected = 0
            yield article, torch.tensor(tokens, dtype=torch.long)


# -- key/value pairs --------------------------------------------------------------------------------
def split_key_values(tokens: torch.Tensor, num_kv_pairs: int, tokens_per_key: int,
                     tokens_per_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut [B, N*(Tk+Tv)] article tokens into keys [B, N, Tk] and values [B, N, Tv] (views, no copies).

    Pair i is tokens[i*(Tk+Tv) : (i+1)*(Tk+Tv)]; its first Tk tokens are the key, the rest the value.
    """
    B = tokens.shape[0]
    assert tokens.shape == (B, num_kv_pairs * (tokens_per_key + tokens_per_value)), tokens.shape
    pairs = tokens.view(B, num_kv_pairs, tokens_per_key + tokens_per_value)
    return pairs[..., :tokens_per_key], pairs[..., tokens_per_key:]


def sample_chunks(batch_size: int, num_kv_pairs: int, pool_size: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Pool [B, P]: for each trajectory a random subset of pairs 1..N-1 (pair 0 is the in-context example)."""
    assert 1 <= pool_size <= num_kv_pairs - 1, (pool_size, num_kv_pairs)
    order = torch.rand(batch_size, num_kv_pairs - 1, generator=generator).argsort(dim=1)
    return order[:, :pool_size] + 1  # [B, P]


@dataclass
class KeyValueBatch:
    """B articles cut into pairs; every tensor has fixed dimensions (SPEC.md §4.4 `KeyValuePair`, batched)."""

    key_tokens: torch.Tensor  # [B, N, Tk]
    value_tokens: torch.Tensor  # [B, N, Tv]
    pool: torch.Tensor  # [B, P] pair indices in 1..N-1, distinct per row
    article_ids: list[str]
    titles: list[str]
    key_embeddings: torch.Tensor | None = None  # [B, N, Hkv*D] ([B, N, Tk, Hkv*D] per token), by `add_embeddings`
    position: DataPosition = field(default_factory=DataPosition)  # stream position after this batch

    def __post_init__(self) -> None:
        B, N, _ = self.key_tokens.shape
        assert self.value_tokens.shape[:2] == (B, N), (self.key_tokens.shape, self.value_tokens.shape)
        assert self.pool.ndim == 2 and self.pool.shape[0] == B, self.pool.shape
        assert len(self.article_ids) == len(self.titles) == B
        if self.key_embeddings is not None:
            assert self.key_embeddings.shape[:2] == (B, N), self.key_embeddings.shape

    @property
    def batch_size(self) -> int:
        return self.key_tokens.shape[0]

    def rows(self, start: int, stop: int) -> "KeyValueBatch":
        """Trajectories start..stop-1 as a batch of their own (views; for splitting a batch that does not fit)."""
        emb = None if self.key_embeddings is None else self.key_embeddings[start:stop]
        return KeyValueBatch(self.key_tokens[start:stop], self.value_tokens[start:stop], self.pool[start:stop],
                             self.article_ids[start:stop], self.titles[start:stop], emb, self.position)


def iter_pair_batches(tokenized: Iterable[tuple[dict, torch.Tensor]], cfg: TrainConfig, batch_size: int,
                      position: DataPosition | None = None, generator: torch.Generator | None = None,
                      per_article: int = 1) -> Iterator[KeyValueBatch]:
    """Group tokenised articles into `KeyValueBatch`es of `batch_size` rows, cut into `cfg`'s pairs, with
    sampled pools; with `per_article` K each article fills K consecutive rows with the same pool (a group
    whose trajectories differ only by their own queries and choices)."""
    assert batch_size % per_article == 0, (batch_size, per_article)
    it = iter(tokenized)
    while chunk := list(itertools.islice(it, batch_size // per_article)):
        if len(chunk) < batch_size // per_article:
            return  # a finite stream's remainder would break the fixed batch shape
        tokens = torch.stack([t for _, t in chunk])  # [B/K, N*(Tk+Tv)]
        keys, values = split_key_values(tokens, cfg.num_kv_pairs, cfg.tokens_per_key, cfg.tokens_per_value)
        pool = sample_chunks(len(chunk), cfg.num_kv_pairs, cfg.pool_size, generator)
        if per_article > 1:
            keys, values, pool = (x.repeat_interleave(per_article, dim=0) for x in (keys, values, pool))
        yield KeyValueBatch(keys, values, pool, [str(a["id"]) for a, _ in chunk for _ in range(per_article)],
                            [a["title"] for a, _ in chunk for _ in range(per_article)],
                            position=dataclasses.replace(position) if position else DataPosition())


def add_embeddings(batches: Iterable[KeyValueBatch],
                   embed_fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[KeyValueBatch]:
    """Attach key embeddings, computed once per batch: `embed_fn` maps [M, Tk] token ids to [M, E] (or to
    [M, Tk, E] for the per-token readout)."""
    for batch in batches:
        B, N, Tk = batch.key_tokens.shape
        emb = embed_fn(batch.key_tokens.reshape(B * N, Tk))  # [B*N, E] or [B*N, Tk, E]
        assert emb.shape[0] == B * N and (emb.ndim == 2 or emb.shape[1] == Tk), emb.shape
        batch.key_embeddings = emb.view(B, N, *emb.shape[1:])
        yield batch


def long_articles(cfg: TrainConfig, tokenizer, split: str = "train", min_tokens: int | None = None,
                  passes: int | None = None, start: DataPosition | None = None,
                  position: DataPosition | None = None, max_tokens: int | None = None) -> Iterator[tuple[dict, torch.Tensor]]:
    """The one entry point for "long-enough articles of a split": (article, ids [min_tokens..max_tokens]) for
    each article of `split` with at least `min_tokens` tokens (default `cfg.min_article_tokens`), tokenised
    one at a time so that `position` after an article is exactly the articles consumed."""
    articles = iter_wikipedia_articles(cfg, start=start, position=position, split=split, passes=passes)
    return tokenize_articles(articles, tokenizer, min_tokens or cfg.min_article_tokens, cfg.max_scan_articles,
                             batch_size=1, max_tokens=max_tokens)


def heldout_articles(cfg: TrainConfig, tokenizer, num_articles: int,
                     max_tokens: int | None = None) -> list[tuple[dict, torch.Tensor]]:
    """The first `num_articles` (0: every one) long-enough held-out articles, in the seed-independent order
    of `corpus.iter_heldout_articles`, with up to `max_tokens` tokens each."""
    if num_articles == 0 and not is_local_corpus(cfg):
        raise ValueError(f"{cfg.dataset_name} is streamed: its held-out split cannot be read whole; give "
                         "--num_articles a number")
    tokenized = tokenize_articles(iter_heldout_articles(cfg), tokenizer, cfg.min_article_tokens,
                                  cfg.max_scan_articles, batch_size=1, max_tokens=max_tokens)
    return list(itertools.islice(tokenized, num_articles or None))


def iter_key_value_batches(cfg: TrainConfig, tokenizer, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None,
                           start: DataPosition | None = None, generator: torch.Generator | None = None,
                           split: str = "train", passes: int | None = None) -> Iterator[KeyValueBatch]:
    """The whole pipeline of SPEC.md §4.4: articles -> filter -> pairs -> pools -> key embeddings. With
    `cfg.max_train_articles` N the training split is N long-enough articles (after the first
    `cfg.skip_train_articles`), cycled."""
    position = DataPosition()
    if cfg.max_train_articles and split == "train":
        tokenized = cycled_articles(cfg, tokenizer, cfg.max_train_articles, start, position)
    else:
        tokenized = long_articles(cfg, tokenizer, split, passes=passes, start=start, position=position)
    batches = iter_pair_batches(tokenized, cfg, cfg.generation_batch_size, position, generator,
                                cfg.trajectories_per_article)
    return add_embeddings(batches, embed_fn) if embed_fn is not None else batches


def cycled_articles(cfg: TrainConfig, tokenizer, n: int, start: DataPosition | None = None,
                    position: DataPosition | None = None) -> Iterator[tuple[dict, torch.Tensor]]:
    """`n` long-enough training articles of the stream's first pass, after its first `cfg.skip_train_articles`,
    cycled in that order forever. `position.index` counts the articles yielded, so a checkpoint resumes the cycle
    where it was."""
    skip = cfg.skip_train_articles
    fixed = list(itertools.islice(long_articles(cfg, tokenizer, "train", passes=1), skip, skip + n))
    if len(fixed) < n:
        raise ValueError(f"max_train_articles={n} after skip_train_articles={skip}, but {cfg.dataset_name} has only "
                         f"{skip + len(fixed)} training articles of {cfg.min_article_tokens} tokens: lower "
                         "max_train_articles, skip_train_articles or num_kv_pairs")
    position = position if position is not None else DataPosition()
    position.epoch, position.index = 0, (start.index if start else 0)
    while True:
        article = fixed[position.index % n]
        position.index += 1
        yield article


def article_token_lengths(articles: Iterable[dict], tokenizer) -> list[int]:
    """Full token count of each article (no truncation): for exploring the minimum-token filter."""
    return [len(ids) for ids in tokenizer([a["text"] for a in articles], add_special_tokens=False)["input_ids"]]


def pair_table(batch: KeyValueBatch, tokenizer, row: int = 0) -> list[dict]:
    """One article's pairs as rows (index, in pool, key/value text and ids) for display."""
    pool = set(batch.pool[row].tolist())
    return [{"pair": i, "role": "example" if i == 0 else ("pool" if i in pool else "-"),
             "key": tokenizer.decode(batch.key_tokens[row, i]), "value": tokenizer.decode(batch.value_tokens[row, i]),
             "key_ids": batch.key_tokens[row, i].tolist(), "value_ids": batch.value_tokens[row, i].tolist()}
            for i in range(batch.key_tokens.shape[1])]


def retokenisation_drift(token_ids: torch.Tensor, tokenizer, chunk: int) -> list[dict]:
    """Cut `token_ids` [T] into consecutive `chunk`-token pieces, as the pairs are cut, and return the pieces
    whose decoded text encodes back to other ids: `start`, `text`, `ids` and `again` (the re-encoded ids), and
    `at`, the first position where they differ. Shows why sequences are built from ids, never from text."""
    drift = []
    for start in range(0, len(token_ids) - chunk + 1, chunk):
        ids = token_ids[start:start + chunk].tolist()
        text = tokenizer.decode(ids)
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        if again != ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, again)) if a != b), min(len(ids), len(again)))
            drift.append({"start": start, "text": text, "ids": ids, "again": again, "at": at})
    return drift
