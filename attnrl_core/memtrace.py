"""The memory a phase really allocates, measured without a GPU: the project's own rollout and update micro-batch
run on PyTorch's `meta` device (shapes and bytes, no values, no time) under a dispatch mode that counts the bytes
of every tensor storage alive, and its peak. The check of `memory.plan`: a change that adds a buffer shows here.

What stands in for CUDA on `meta`: scaled-dot-product attention runs as CUDA's fused kernels do (flash without a
mask, memory-efficient with one: output and log-sum-exp saved, no [S, S] score matrix), through transformers'
own CUDA path (key/value heads repeated where it repeats them). A read of a boolean value (transformers' checks,
e.g. for packed sequences) answers True; a read of any number fails, so the traced code must make none.
Imports attnrl_core.config, .data, .memory, .model, .resilience and .training.
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary
from transformers import AutoModelForCausalLM, LlamaConfig

from .config import TrainConfig
from .data import KeyValueBatch, Separators
from .memory import ModelShape, SequenceShape
from .model import attach_adapter, float32_head, gqa_attention, head_geometry, set_gradient_checkpointing
from .resilience import FallbackState, rollout_resilient
from .training import micro_batch_terms, read_length


FREE = -1  # an event's bytes when it frees its allocation
_VALUE_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created inside it that are still alive (`live`), and their
    peak (`peak`), from any baseline (`reset_peak`); the storages of `existing` tensors are not counted."""

    def __init__(self, existing: list[torch.Tensor] = (), record: bool = False):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        for t in existing:  # e.g. the weights: a view of one (`.t()`) is not a new allocation
            self._seen[t.untyped_storage()] = 0
        self.live = 0
        self.peak = 0
        # with `record`: the accelerator's allocations and frees in order, for `Allocator.replay`: (number, bytes) at
        # an allocation, (number, FREE) when it is freed; host tensors (the tokens `data` gives) are left out
        self.events: list[tuple[int, int]] | None = [] if record else None

    def _free(self, nbytes: int, number: int | None = None) -> None:
        self.live -= nbytes
        if number is not None:
            self.events.append((number, FREE))

    def mark(self) -> int:
        """The position in `events` now (a phase's boundary)."""
        return len(self.events)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _VALUE_READS and args[0].device.type == "meta":  # a host tensor's value is there to read
            tensor = args[0]
            if tensor.dtype != torch.bool:
                raise RuntimeError(f"the traced code reads a number from a tensor ({func}): a host synchronisation")
            return True
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen[storage] = nbytes
                    self.live += nbytes
                    number = None
                    if self.events is not None and t.device.type == "meta":
                        number = len(self.events)
                        self.events.append((number, nbytes))
                    weakref.finalize(storage, self._free, nbytes, number)
        self.peak = max(self.peak, self.live)
        return out


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention as CUDA's fused kernels allocate it (on `meta`, where SDPA would otherwise
    expand to the math path and its [S, S] scores)."""
    if attn_mask is None:  # flash reads grouped key/value heads as they are (enable_gqa)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    if attn_mask.dtype == torch.bool:  # CUDA converts a boolean mask to an additive bias of the query's dtype
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    bias = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, query.requires_grad,
                                                                  dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def cuda_attention():
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


def meta_model(shape: ModelShape, cfg: TrainConfig, layers: int) -> nn.Module:
    """A Llama of `shape`'s widths with `layers` decoder layers on `meta`, in the dtype a CUDA run uses, with the
    project's head, attention and adapter."""
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=layers, num_attention_heads=shape.query_heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                         tie_word_embeddings=shape.tied, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=shape.dtype).eval()
    model.set_attn_implementation(gqa_attention())
    model = attach_adapter(float32_head(model), cfg)
    set_gradient_checkpointing(model, bool(cfg.gradient_checkpointing))
    return model


def meta_batch(rows: int, cfg: TrainConfig, shape: ModelShape, seq: SequenceShape) -> tuple[KeyValueBatch, Separators]:
    """A batch of `rows` articles with `seq`'s lengths (tokens on the host as `data` gives them, key embeddings
    on `meta`)."""
    N, P = cfg.num_kv_pairs, seq.steps
    batch = KeyValueBatch(torch.zeros(rows, N, cfg.tokens_per_key, dtype=torch.long),
                          torch.zeros(rows, N, cfg.tokens_per_value, dtype=torch.long),
                          torch.arange(1, P + 1).expand(rows, P).clone(), ["a"] * rows, ["a"] * rows,
                          torch.zeros(rows, N, shape.kv_heads * shape.head_dim, device="meta"))
    sep = Separators(torch.zeros(seq.query_separator, dtype=torch.long),
                     torch.zeros(seq.response_separator, dtype=torch.long), torch.zeros(seq.bos, dtype=torch.long))
    return batch, sep


@dataclass
class Trace:
    static_bytes: int  # weights, head, adapter: what exists before a phase
    rollout_bytes: int  # the rollout's peak above static
    update_bytes: int  # one update micro-batch's peak above static, the rollout's trajectory alive (its kept logits)


@dataclass
class EpisodesTrace:
    """`trace_episodes`: each episode's phase peaks above static, and with `record` the accelerator's allocations
    in order (`events`; the weights' sizes in `weights`) with each phase's (first, end) event in `phases`, for
    `Allocator`."""

    static_bytes: int
    episodes: list[Trace]
    weights: list[int]
    events: list[tuple[int, int]] | None
    phases: list[tuple[str, int, int]]


def _episode(model, batch, sep, cfg: TrainConfig, chunks: FallbackState, micro_batch: int, live: LiveBytes,
             oracle: bool, keep_query_logits: bool, phases: list) -> tuple[int, int]:
    """One episode's rollout and update micro-batch as `run.train` runs them: the trajectory is this function's
    local, dead when the episode ends, before the next rollout (issue 38). (rollout peak, update peak)."""
    live.reset_peak()
    first = live.mark() if live.events is not None else 0
    model.eval()
    traj = rollout_resilient(model, batch, sep, head_geometry(model), chunks, str, tokens_per_query=cfg.tokens_per_query,
                             oracle=oracle, keep_query_logits=keep_query_logits, similarity_layer=cfg.similarity_layer)
    rollout_peak = live.peak
    if live.events is not None:
        phases.append(("rollout", first, live.mark()))
        first = live.mark()
    if not micro_batch:  # a rollout that does not train (evaluation)
        return rollout_peak, 0
    live.reset_peak()
    rows = torch.arange(micro_batch)
    positions = traj.query_positions
    model.train()
    terms = micro_batch_terms(model, traj, rows, traj.tokens[:micro_batch].clone(), positions, read_length(positions),
                              positions.numel(), torch.zeros(micro_batch, device="meta"), cfg, params=None,
                              previous=None)
    terms.loss.backward()
    del terms
    model.zero_grad(set_to_none=True)  # as the optimizer step does
    if live.events is not None:
        phases.append(("update", first, live.mark()))
    return rollout_peak, live.peak


def trace_episodes(cfg: TrainConfig, shape: ModelShape, seq: SequenceShape, layers: int, rollout_rows: int,
                   micro_batch: int, episodes: int = 2, oracle: bool = False, keep_query_logits: bool = True,
                   record: bool = False) -> EpisodesTrace:
    """The live-byte peaks of `episodes` episodes, each a rollout of the config's generation batch in chunks of
    `rollout_rows` (as `train` rolls out) and one update micro-batch of `micro_batch` (0: none), on a `layers`-layer
    model of `shape` on `meta`; with `record`, every allocation in order (`Allocator` replays them)."""
    model = meta_model(shape, cfg, layers)
    weights = [*model.parameters(), *model.buffers()]
    static = sum(t.untyped_storage().nbytes() for t in weights)
    batch, sep = meta_batch(cfg.generation_batch_size, cfg, shape, seq)
    chunks = FallbackState(rollout_rows, micro_batch, 1)
    peaks, phases = [], []
    with cuda_attention(), LiveBytes(weights, record) as live:
        for _ in range(episodes):
            rollout_peak, update_peak = _episode(model, batch, sep, cfg, chunks, micro_batch, live, oracle,
                                                 keep_query_logits, phases)
            peaks.append(Trace(static, rollout_peak, update_peak))
    sizes = [t.untyped_storage().nbytes() for t in weights if t.device.type == "meta"]
    return EpisodesTrace(static, peaks, sizes, live.events, phases)


def trace(cfg: TrainConfig, shape: ModelShape, seq: SequenceShape, layers: int, rollout_rows: int,
          micro_batch: int, oracle: bool = False, keep_query_logits: bool = True) -> Trace:
    """The live-byte peaks of one episode (`trace_episodes`): a rollout in chunks of `rollout_rows` and one update
    micro-batch of `micro_batch` (0: none)."""
    return trace_episodes(cfg, shape, seq, layers, rollout_rows, micro_batch, 1, oracle, keep_query_logits).episodes[0]


# -- the caching allocator's model ---------------------------------------------------------------------
# PyTorch's CUDA caching allocator at its defaults (c10/cuda/CUDACachingAllocator.cpp, c10/core/AllocatorConfig.h):
# sizes rounded up to 512 B; requests up to 1 MiB from 2 MiB segments (the small pool), larger ones from the large
# pool, whose new segments are 20 MiB for requests under 10 MiB and the request rounded up to 2 MiB above; the
# smallest free block that fits (best fit, then the lowest address), split when more than 1 MiB (large) or 512 B
# (small) is left; a freed block merges with free neighbours of its segment. When the card has no room for a new
# segment, every wholly free segment is released and the request retried; a segment with one live block in it
# stays, with its free blocks (the holes). With expandable segments (PYTORCH_CUDA_ALLOC_CONF=
# expandable_segments:True) each pool is one segment mapped in pages (20 MiB large, 2 MiB small): a request no free
# block fits maps pages after the lowest free stretch of address space it can extend (normally the end), and when
# the card is full the pages wholly inside free blocks are unmapped and the request retried.
_SMALL, _SMALL_SEGMENT, _LARGE_SEGMENT, _MIN_LARGE, _ROUND_LARGE, _MIN_BLOCK = 2**20, 2**21, 20 * 2**20, 10 * 2**20, \
    2**21, 512


class OutOfMemory(Exception):
    pass


class _Block:
    __slots__ = ("addr", "size", "free", "mapped", "prev", "next", "small")

    def __init__(self, addr: int, size: int, small: bool, free: bool = True, mapped: bool = True):
        self.addr, self.size, self.small, self.free, self.mapped = addr, size, small, free, mapped
        self.prev = self.next = None


class Allocator:
    """The caching allocator's model (above) on a card of `limit` bytes (None: unlimited): `reserved` is what it
    holds from the card, `peak_reserved` its most; `malloc`/`free` by an allocation's number; `OutOfMemory` when
    even after releasing what it may the card has no room."""

    _SPACE = 2**40  # address space per segment: far apart, never adjacent

    def __init__(self, limit: int | None = None, expandable: bool = False):
        self.limit, self.expandable = limit, expandable
        self.reserved = self.peak_reserved = 0
        self._free = {True: [], False: []}  # per pool (small?): sorted (size, addr) of free mapped blocks
        self._by_addr: dict[int, _Block] = {}
        self._live: dict[int, _Block] = {}
        self._next_segment = 0
        self._unmapped = {True: [], False: []}  # expandable: sorted addresses of unmapped blocks
        if expandable:
            for small in (True, False):
                self._add_block(_Block(self._new_address(), self._SPACE, small, mapped=False))

    # -- the pools' indexes
    def _new_address(self) -> int:
        self._next_segment += 1
        return self._next_segment * self._SPACE

    def _add_block(self, b: _Block) -> None:
        self._by_addr[b.addr] = b
        if not b.mapped:
            bisect.insort(self._unmapped[b.small], b.addr)
        elif b.free:
            bisect.insort(self._free[b.small], (b.size, b.addr))

    def _drop_block(self, b: _Block) -> None:
        del self._by_addr[b.addr]
        if not b.mapped:
            self._unmapped[b.small].remove(b.addr)
        elif b.free:
            index = bisect.bisect_left(self._free[b.small], (b.size, b.addr))
            del self._free[b.small][index]

    def _split(self, b: _Block, size: int, **rest) -> _Block:
        """`b` cut to `size`; the rest a new block after it (of `rest`'s state), returned."""
        self._drop_block(b)
        after = _Block(b.addr + size, b.size - size, b.small, **{"free": b.free, "mapped": b.mapped, **rest})
        after.prev, after.next = b, b.next
        if b.next:
            b.next.prev = after
        b.next, b.size = after, size
        self._add_block(b)
        self._add_block(after)
        return after

    def _absorb(self, left: _Block, right: _Block) -> _Block:
        """`right` joined into `left`, the block before it; `left` returned."""
        self._drop_block(left)
        self._drop_block(right)
        left.size += right.size
        left.next = right.next
        if right.next:
            right.next.prev = left
        self._add_block(left)
        return left

    def _merge(self, b: _Block) -> _Block:
        """`b` joined with its neighbours of the same state (free and mapped, or unmapped)."""
        same = lambda n: n is not None and n.free and n.mapped == b.mapped  # noqa: E731
        while same(b.prev):
            b = self._absorb(b.prev, b)
        while same(b.next):
            b = self._absorb(b, b.next)
        return b

    def _room(self, nbytes: int) -> bool:
        return self.limit is None or self.reserved + nbytes <= self.limit

    def _reserve(self, nbytes: int) -> None:
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    # -- where a request goes
    def _best_fit(self, size: int, small: bool) -> _Block | None:
        free = self._free[small]
        index = bisect.bisect_left(free, (size, -1))
        return self._by_addr[free[index][1]] if index < len(free) else None

    def _new_segment(self, size: int, small: bool) -> _Block | None:
        nbytes = _SMALL_SEGMENT if small else _LARGE_SEGMENT if size < _MIN_LARGE else -(-size // _ROUND_LARGE) * _ROUND_LARGE
        if not self._room(nbytes):
            return None
        self._reserve(nbytes)
        b = _Block(self._new_address(), nbytes, small)
        self._add_block(b)
        return b

    def _expand(self, size: int, small: bool) -> _Block | None:
        """Expandable: map pages into the lowest stretch of free and unmapped blocks that can hold `size` (an
        unmapped block and the free block before it, normally the segment's end)."""
        page = _SMALL_SEGMENT if small else _LARGE_SEGMENT
        for addr in list(self._unmapped[small]):
            c = self._by_addr[addr]
            if c.prev is not None and c.prev.free and c.prev.mapped:
                c = c.prev
            stretch, total, n = [], 0, c
            while total < size and n is not None and n.free:
                stretch.append((n, size - total))  # each block with what is still wanted when it is reached
                total, n = total + n.size, n.next
            if total < size:
                continue
            pages = [(x, min(x.size, -(-want // page) * page)) for x, want in stretch if not x.mapped]
            if not self._room(sum(nbytes for _, nbytes in pages)):
                return None
            for x, nbytes in pages:
                self._reserve(nbytes)
                if nbytes < x.size:
                    self._split(x, nbytes)
                self._drop_block(x)
                x.mapped = True
                self._add_block(x)
                x = self._merge(x)
            return x  # the stretch's mapped blocks, merged into one
        return None

    def _release(self) -> None:
        """At a full card: free every wholly free segment (unmap every free page, expandable)."""
        for small in (True, False):
            for size, addr in list(self._free[small]):
                b = self._by_addr[addr]
                if not self.expandable:
                    if b.prev is None and b.next is None:
                        self._drop_block(b)
                        self.reserved -= b.size
                    continue
                page = _SMALL_SEGMENT if small else _LARGE_SEGMENT
                start, end = -(-b.addr // page) * page, (b.addr + b.size) // page * page
                if end <= start:
                    continue
                if start > b.addr:
                    b = self._split(b, start - b.addr)
                if end < b.addr + b.size:
                    self._split(b, end - b.addr)
                self._drop_block(b)
                b.mapped = False
                self._add_block(b)
                self.reserved -= end - start
                self._merge(b)

    def malloc(self, number: int, nbytes: int) -> None:
        size = max(_MIN_BLOCK, -(-nbytes // _MIN_BLOCK) * _MIN_BLOCK)
        small = size <= _SMALL
        grow = self._expand if self.expandable else self._new_segment
        b = self._best_fit(size, small) or grow(size, small)
        if b is None:
            self._release()
            b = self._best_fit(size, small) or grow(size, small)
            if b is None:
                raise OutOfMemory(f"{nbytes} bytes with {self.reserved} reserved of {self.limit}")
        if b.size - size > (_MIN_BLOCK - 1 if small else _SMALL):
            self._split(b, size)
        self._drop_block(b)
        b.free = False
        self._add_block(b)
        self._live[number] = b

    def free(self, number: int) -> None:
        b = self._live.pop(number)
        self._drop_block(b)
        b.free = True
        self._add_block(b)
        self._merge(b)

    def replay(self, weights: list[int], events: list[tuple[int, int]]) -> "Allocator":
        """The weights allocated one by one (as a model moved to the card is), then `events` in order."""
        for i, nbytes in enumerate(weights):
            self.malloc(-1 - i, nbytes)
        for number, nbytes in events:
            if nbytes == FREE:
                self.free(number)
            else:
                self.malloc(number, nbytes)
        return self


def card_needed(weights: list[int], events: list[tuple[int, int]], expandable: bool, step: int = 2**20) -> int:
    """The smallest card (bytes the allocator may reserve, to `step`) on which the allocator's model replays
    `events` without running out: the allocated peak plus what the allocator cannot hand back."""
    low = sum(weights)
    high = Allocator(None, expandable).replay(weights, events).peak_reserved
    while high - low > step:
        middle = (low + high) // 2
        try:
            Allocator(middle, expandable).replay(weights, events)
            high = middle
        except OutOfMemory:
            low = middle
    return high
