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


_VALUE_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages created inside it that are still alive (`live`), and their
    peak (`peak`), from any baseline (`reset_peak`); the storages of `existing` tensors are not counted."""

    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        for t in existing:  # e.g. the weights: a view of one (`.t()`) is not a new allocation
            self._seen[t.untyped_storage()] = 0
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

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
                    weakref.finalize(storage, self._free, nbytes)
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


def trace(cfg: TrainConfig, shape: ModelShape, seq: SequenceShape, layers: int, rollout_rows: int,
          micro_batch: int, oracle: bool = False, keep_query_logits: bool = True) -> Trace:
    """The live-byte peaks of a rollout of the config's generation batch in chunks of `rollout_rows` (as `train`
    rolls out) and one update micro-batch of `micro_batch` (0: none) on a `layers`-layer model of `shape` on
    `meta`."""
    model = meta_model(shape, cfg, layers)
    weights = [*model.parameters(), *model.buffers()]
    static = sum(t.untyped_storage().nbytes() for t in weights)
    batch, sep = meta_batch(cfg.generation_batch_size, cfg, shape, seq)
    geo = head_geometry(model)
    chunks = FallbackState(rollout_rows, micro_batch, 1)
    with cuda_attention(), LiveBytes(weights) as live:
        traj = rollout_resilient(model, batch, sep, geo, chunks, str, tokens_per_query=cfg.tokens_per_query,
                                 oracle=oracle, keep_query_logits=keep_query_logits,
                                 similarity_layer=cfg.similarity_layer)
        rollout_peak = live.peak
        if not micro_batch:  # a rollout that does not train (evaluation)
            return Trace(static, rollout_peak, 0)
        live.reset_peak()
        rows = torch.arange(micro_batch)
        positions = traj.query_positions
        model.train()
        terms = micro_batch_terms(model, traj, rows, traj.tokens[:micro_batch].clone(), positions,
                                  read_length(positions), positions.numel(), torch.zeros(micro_batch, device="meta"),
                                  cfg, params=None, previous=None)
        terms.loss.backward()
    return Trace(static, rollout_peak, live.peak)
