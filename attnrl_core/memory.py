"""The memory plan: what a run's phases allocate on the accelerator, term by term, from its config and its model's
shape alone (no model, no GPU), and the largest rollout chunk and update micro-batch that fit a given memory.

Each term is counted from the tensors the code allocates (`memtrace` runs that code on the `meta` device and a
test holds this plan to it):
- static: the weights (`model.Float32Head` reads the head's own in a GEMM with float32 output on a GPU: no
  float32 copy); the LoRA adapter (float32, peft's default) and 8-bit Adam's two moments (the optimizer);
- rollout of R rows (2R through every forward pass: policy and base model): the KV cache, allocated once for the
  final length; the policy's kept float32 sampling logits [R, P*Tq, V] (training only); the largest transient of a
  step (a decode step's logits and sampling, or the value scoring pass: key/value heads repeated for a masked
  read as transformers does on CUDA, an MLP's intermediate, one chunk of scoring logits); with the oracle (the
  selection objective, the evaluation of the trained method), every pair left scored on K copies of the cache;
- update micro-batch of n rows: the batch's kept logits (alive through the update), the activations autograd
  saves per token and layer (or only each layer's input with gradient checkpointing, plus one layer recomputed),
  the loss's chunk of [n, positions, V] float32 tensors (`loss.chunked_reinforce_loss`), the adapter's gradients.
Imports attnrl_core.config and attnrl_core.decoding (the chunk size of vocabulary-sized tensors) only.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch

from .config import TrainConfig
from .decoding import chunk_length

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only Llama-family model."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.bfloat16) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   head_dim, bool(getattr(config, "tie_word_embeddings", False)), dtype)

    @property
    def bytes(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def module_sizes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a decoder layer, by the name LoRA targets it with."""
        H, I, q, kv = self.hidden, self.intermediate, self.query_heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
                "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}

    def parameters(self) -> int:
        layer = sum(i * o for i, o in self.module_sizes().values()) + 2 * self.hidden  # + the two RMSNorms
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * layer + self.hidden


# Llama-3.2-3B's config (meta-llama/Llama-3.2-3B, config.json): the plan of SPEC's run needs no download
PRESET_SHAPES = {
    "llama-3.2-3b": ModelShape(vocab=128256, hidden=3072, intermediate=8192, layers=28, query_heads=24, kv_heads=8,
                               head_dim=128, tied=True),
    "embedded": ModelShape(vocab=49152, hidden=576, intermediate=1536, layers=30, query_heads=9, kv_heads=3,
                           head_dim=64, tied=True, dtype=torch.float32),
}


@dataclass(frozen=True)
class SequenceShape:
    """Token counts of the prompt format (`data.Separators`: Llama 3's and SmolLM2's ` Query:` and ` Response:`
    are 2 tokens each, and Llama 3 adds a BOS) and the steps of a trajectory."""

    bos: int
    query_separator: int
    response_separator: int
    steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, bos: int = 1, query_separator: int = 2, response_separator: int = 2) -> "SequenceShape":
        return cls(bos, query_separator, response_separator, math.ceil(cfg.subset_fraction * cfg.num_kv_pairs))

    def lengths(self, cfg: TrainConfig) -> dict[str, int]:
        """initial (the context before step 0), step, total (the final length), queries (positions the loss reads),
        read (tokens the update's teacher-forced pass reads: up to the last query token, `training.read_length`)."""
        qs, rs, Tq, Tv = self.query_separator, self.response_separator, cfg.tokens_per_query, cfg.tokens_per_value
        initial = self.bos + qs + cfg.tokens_per_key + rs + Tv
        step = qs + Tq + rs + Tv
        return dict(initial=initial, step=step, total=initial + self.steps * step, queries=self.steps * Tq,
                    read=initial + (self.steps - 1) * step + qs + Tq - 1)


def lora_parameters(shape: ModelShape, cfg: TrainConfig) -> tuple[int, int]:
    """(the adapter's parameters, the sum of the input widths of the modules it wraps in one layer)."""
    sizes = shape.module_sizes()
    targets = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip() in sizes]
    return (shape.layers * sum(cfg.lora_r * (sizes[m][0] + sizes[m][1]) for m in targets),
            sum(sizes[m][0] for m in targets))


def saved_bytes_per_token_layer(shape: ModelShape, cfg: TrainConfig) -> int:
    """What autograd keeps per token and decoder layer for the update's backward (counted by `memtrace` with
    saved-tensor hooks): the two RMSNorms' float32 inputs; per LoRA-wrapped module two float32 copies of its input
    (the cast to the adapter's dtype and, with dropout, the dropped input); the attention's query and output and
    its key and value (grouped heads, as flash reads them); the MLP's gate, up and activation outputs."""
    b, q, kv = shape.bytes, shape.query_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    _, lora_inputs = lora_parameters(shape, cfg)
    copies = 2 if cfg.lora_dropout > 0 else 1
    return 2 * 4 * shape.hidden + copies * 4 * lora_inputs + b * (2 * q + 2 * kv) + 3 * b * shape.intermediate


@dataclass
class Plan:
    """Bytes of each term (`terms`) and each phase's peak: `static`, then `rollout` and `update` above it."""

    rollout_rows: int
    micro_batch: int
    terms: dict[str, int]
    static: int
    rollout: int
    update: int

    @property
    def peak(self) -> int:
        return self.static + max(self.rollout, self.update)

    def as_dict(self) -> dict:
        return {**asdict(self), "peak": self.peak}


def plan(cfg: TrainConfig, shape: ModelShape, seq: SequenceShape | None = None, rollout_rows: int | None = None,
         micro_batch: int | None = None, keep_query_logits: bool = True, oracle: bool | None = None) -> Plan:
    """The plan of a rollout of `rollout_rows` (default the generation batch) and an update micro-batch of
    `micro_batch` (default the training batch) for `cfg` on a model of `shape`. `keep_query_logits` False: a
    rollout that does not train (evaluation). `oracle` (default: when the selection objective is on) adds the
    scoring of every pair left."""
    seq = seq or SequenceShape.of(cfg)
    R = rollout_rows or cfg.generation_batch_size
    n = micro_batch or cfg.training_batch_size
    oracle = bool(cfg.choice_target_weight) if oracle is None else oracle
    lengths = seq.lengths(cfg)
    V, H, b, layers = shape.vocab, shape.hidden, shape.bytes, shape.layers
    kv_token = layers * 2 * shape.kv_heads * shape.head_dim * b  # one token's keys and values, every layer
    adapter, _ = lora_parameters(shape, cfg)
    Tv, M = cfg.tokens_per_value, lengths["queries"]
    t = {
        "weights": shape.parameters() * b,
        "adapter": adapter * 4,
        "optimizer": adapter * 2,  # 8-bit Adam: two one-byte moments per parameter (block statistics aside)
    }
    # -- rollout
    t["kv_cache"] = 2 * R * lengths["total"] * kv_token
    # the whole batch's buffer, whatever the chunk: every chunk writes its rows of it (`resilience`)
    t["kept_logits"] = cfg.generation_batch_size * M * V * 4 if keep_query_logits else 0
    scoring_tokens = 1 + seq.response_separator + Tv
    scoring_logits = chunk_length(Tv * V * 4, 2 * R) * Tv * V * 4  # one row chunk of `decoding.head_logprobs`
    # the largest moment of a step (one at a time): a decode step's logits, softmax and cumulative sum; a masked
    # read at the final length, whose key and value heads transformers repeats (2R rows, one layer at a time);
    # a row chunk of scoring logits and `logsumexp`'s temporary
    # (with, during a multi-token pass, every layer's [rows, tokens, H] output alive until the pass ends, and in the
    # layer reading: the embeddings, the normalised input and the attention's query: `memtrace`)
    repeated_kv = 2 * 2 * R * shape.query_heads * lengths["total"] * shape.head_dim * b
    layer_outputs = (layers + 3) * 2 * R * scoring_tokens * H * b
    t["rollout_transient"] = max(3 * 2 * R * V * 4, repeated_kv + layer_outputs, 2 * scoring_logits)
    t["oracle"] = 0
    if oracle:  # step s: K = P - s pairs left, each scored on a copy of the 2R rows' cache (`score_candidates`)
        per_step = []
        for s in range(seq.steps):
            K, length = seq.steps - s, lengths["initial"] + s * lengths["step"] + seq.query_separator + \
                cfg.tokens_per_query - 1 + scoring_tokens
            rows = 2 * R * K
            copying = rows * length * kv_token // layers  # `repeat_interleave`'s copy of one layer, then written in
            reading = 2 * rows * shape.query_heads * length * shape.head_dim * b + \
                (layers + 3) * rows * scoring_tokens * H * b
            per_step.append(rows * length * kv_token + max(copying, reading,
                                                           2 * chunk_length(Tv * V * 4, rows) * Tv * V * 4))
        t["oracle"] = max(per_step)
    # -- update
    read = lengths["read"]
    per_token = saved_bytes_per_token_layer(shape, cfg)
    loss_chunk = chunk_length(n * V * 4, M) * n * V * 4
    t["loss_buffers"] = 7 * loss_chunk  # logits, reference, two log-softmaxes, the KL's terms (`memtrace` counts)
    t["gradients"] = adapter * 4
    t["batch_kept_logits"] = batch_kept = cfg.generation_batch_size * M * V * 4 if keep_query_logits else 0
    if cfg.gradient_checkpointing:
        # each layer's input kept; the loss's chunks run before the backward pass recomputes one layer at a time
        t["activations"] = n * read * layers * H * b
        working = max(t["loss_buffers"], n * read * per_token)
    else:  # every layer's saved tensors, alive when the loss's chunks run
        t["activations"] = n * read * layers * per_token
        working = t["loss_buffers"]
    static = t["weights"] + t["adapter"] + t["optimizer"]
    rollout = t["kv_cache"] + t["kept_logits"] + max(t["rollout_transient"], t["oracle"])
    update = batch_kept + t["activations"] + working + t["gradients"]
    return Plan(R, n, t, static, rollout, update)


def halvings(size: int) -> list[int]:
    """size, size/2, ... 1: the sizes the out-of-memory fallbacks step through (`resilience`)."""
    out = [size]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def choose_sizes(cfg: TrainConfig, shape: ModelShape, free_bytes: int, seq: SequenceShape | None = None,
                 margin: float = 0.1) -> tuple[int, int, Plan]:
    """(rollout chunk, update micro-batch, the plan at those sizes): the largest of the out-of-memory fallbacks'
    sizes whose phase fits `free_bytes` less `margin` (the allocator's fragmentation, kernels' workspaces); 1
    when none does (the fallbacks then have the last word)."""
    budget = free_bytes * (1 - margin)
    chunk = next((r for r in halvings(cfg.generation_batch_size)
                  if plan(cfg, shape, seq, r, 1).static + plan(cfg, shape, seq, r, 1).rollout <= budget), 1)
    micro = next((m for m in halvings(cfg.training_batch_size)
                  if plan(cfg, shape, seq, chunk, m).static + plan(cfg, shape, seq, chunk, m).update <= budget), 1)
    return chunk, micro, plan(cfg, shape, seq, chunk, micro)


def parse_bytes(text: str) -> int:
    """'16GB' / '16GiB' / '16e9' -> bytes (GB = 1e9, GiB = 2**30)."""
    units = {"gib": 2**30, "gb": 1e9, "mib": 2**20, "mb": 1e6, "": 1}
    s = text.strip().lower()
    number, scale = s, 1
    for unit in units:
        if unit and s.endswith(unit):
            number, scale = s[:-len(unit)], units[unit]
            break
    try:
        value = int(float(number) * scale)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"--gpu_memory {text!r} is not a size: write e.g. 16GB, 24GiB or 80e9")
    return value


def format_plan(p: Plan, free_bytes: int | None = None, title: str = "") -> str:
    """The plan as a table: each term, each phase's peak, in GB."""
    t = p.terms
    rows = [("static", p.static, "weights %.2f, adapter %.3f, optimizer %.3f" % tuple(
        t[k] / GB for k in ("weights", "adapter", "optimizer"))),
            (f"rollout, {p.rollout_rows} rows", p.static + p.rollout,
             "KV cache %.2f, kept logits %.2f, step transient %.2f, oracle %.2f" % tuple(
                 t[k] / GB for k in ("kv_cache", "kept_logits", "rollout_transient", "oracle"))),
            (f"update, micro-batch {p.micro_batch}", p.static + p.update,
             "activations %.2f, loss buffers %.2f, the batch's kept logits %.2f, gradients %.3f" % tuple(
                 t[k] / GB for k in ("activations", "loss_buffers", "batch_kept_logits", "gradients")))]
    lines = [title] if title else []
    lines += ["| phase | peak (GB) | terms (GB) |", "|---|---|---|"]
    lines += [f"| {name} | {total / GB:.2f} | {what} |" for name, total, what in rows]
    if free_bytes is not None:
        lines.append(f"peak {p.peak / GB:.2f} GB of {free_bytes / GB:.2f} GB")
    return "\n".join(lines)


def memory_report(cfg: TrainConfig, shape: ModelShape, free_bytes: int, as_json: bool = False,
                  cards: tuple[int, ...] = (24 * 10**9, 80 * 10**9)) -> str:
    """`python -m attnrl_core memory`: the plan at the config's sizes, the sizes chosen for `free_bytes`, what
    `evaluate` (its defaults: chunks of 32 rows, no kept logits, the oracle) peaks at, and the sizes for `cards`."""
    chunk, micro, chosen = choose_sizes(cfg, shape, free_bytes)
    at_config = plan(cfg, shape)
    evaluation = plan(cfg, shape, rollout_rows=min(32, cfg.generation_batch_size), keep_query_logits=False, oracle=True)
    others = {f"{c / GB:.0f}GB": choose_sizes(cfg, shape, c)[:2] for c in cards}
    if as_json:
        return json.dumps({"shape": {**asdict(shape), "dtype": str(shape.dtype)}, "gpu_memory": free_bytes,
                           "plan": at_config.as_dict(), "chosen": {"rollout_chunk": chunk, "micro_batch": micro,
                                                                   "plan": chosen.as_dict()},
                           "evaluate_peak": evaluation.static + evaluation.rollout,
                           "other_cards": {k: {"rollout_chunk": r, "micro_batch": m} for k, (r, m) in others.items()}})
    lines = [format_plan(at_config, title=f"{cfg.preset} at its sizes ({shape.layers} layers, vocabulary {shape.vocab}, "
                                            f"{shape.dtype}; gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}):"),
             f"evaluate (chunks of {evaluation.rollout_rows} rows, oracle): peak "
             f"{(evaluation.static + evaluation.rollout) / GB:.2f} GB",
             f"for {free_bytes / GB:.1f} GB: rollout chunk {chunk}, update micro-batch {micro} "
             f"(accumulation x{cfg.training_batch_size // micro}); peak {chosen.peak / GB:.2f} GB"]
    lines += [f"for {k}: rollout chunk {r}, update micro-batch {m}" for k, (r, m) in others.items()]
    return "\n".join(lines)
