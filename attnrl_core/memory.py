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
- with `--compile`: the pooled KV buffers stay allocated through the update, and the CUDA graph keeps a private
  pool (the decode step's output logits and each layer's output);
- below sm80 in bfloat16: SDPA's math kernel (float32 copies of the repeated key/value heads, full score matrices)
  where the fused kernels take no bfloat16.
What a card spends beyond the allocated bytes (`card`): the CUDA context (outside the allocator), cuBLAS's
workspaces, and the caching allocator's blocks beyond the live bytes (a factor from `memtrace.Allocator`, a model
of PyTorch's allocator replaying the traced allocations; BENCHMARKS.md). With expandable segments (what `train`
sets on CUDA, `use_expandable_segments`) that factor is 2 %, with the default allocator 13 %.
Imports attnrl_core.config and attnrl_core.decoding (the chunk size of vocabulary-sized tensors) only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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

    def in_dtype(self, name: str) -> "ModelShape":
        """The same shape in a `--dtype` (float32, bfloat16, float16); "auto" keeps the preset's GPU dtype."""
        return self if name == "auto" else dataclasses.replace(self, dtype=getattr(torch, name))

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
         micro_batch: int | None = None, keep_query_logits: bool = True, oracle: bool | None = None,
         arch: tuple[int, int] = (8, 0)) -> Plan:
    """The plan of a rollout of `rollout_rows` (default the generation batch) and an update micro-batch of
    `micro_batch` (default the training batch) for `cfg` on a model of `shape`. `keep_query_logits` False: a
    rollout that does not train (evaluation). `oracle` (default: when the selection objective is on) adds the
    scoring of every pair left. `arch`: the card's compute capability (which attention kernel runs)."""
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
    # -- below sm80 in bfloat16, SDPA's math kernel: float32 copies of the query and of the repeated key/value heads,
    # the float32 scores, their masked and softmaxed copies; at the rollout's widest masked read (the value scoring
    # pass at the final length, 2R rows) and the update's (n rows reading `read` tokens, causal)
    t["math_attention"] = t["math_attention_update"] = 0
    if attention_kernel(shape.dtype, arch) == "math":
        q_heads, D, total = shape.query_heads, shape.head_dim, lengths["total"]
        t["math_attention"] = 2 * R * q_heads * 4 * (2 * total * D + 2 * scoring_tokens * D + 3 * scoring_tokens * total)
        t["math_attention_update"] = n * q_heads * 4 * (4 * read * D + 3 * read * read)
    # -- `--compile`: the run's pooled KV buffers (`decoding.DecodeStep`) stay allocated through the update; the CUDA
    # graph's private pool holds the fixed-shape step's output logits and each layer's output (its high-water mark)
    t["compile_kv_pool"] = t["kv_cache"] if cfg.compile else 0
    t["cuda_graph_pool"] = 2 * R * (V * 4 + (layers + 3) * H * b) if cfg.compile else 0
    static = t["weights"] + t["adapter"] + t["optimizer"] + t["cuda_graph_pool"]
    rollout = t["kv_cache"] + t["kept_logits"] + max(t["rollout_transient"] + t["math_attention"], t["oracle"])
    update = batch_kept + t["activations"] + working + t["math_attention_update"] + t["gradients"] + t["compile_kv_pool"]
    return Plan(R, n, t, static, rollout, update)


# -- what a card spends beyond the allocated bytes --------------------------------------------------------------
# The caching allocator's blocks beyond the live bytes, as a fraction of a phase's allocated peak: the most the
# allocator's model (`memtrace.Allocator`) needs at SPEC's sizes over two episodes, 2 and 28 layers (BENCHMARKS.md):
# 0.6-1.4 % with expandable segments, 3.5-12.9 % with the default allocator (at 28 layers the KV buffers, allocated
# layer by layer into blocks each layer's MLP has just freed, leave holes the kept logits cannot use).
ALLOCATOR_OVERHEAD = {"expandable_segments": 0.02, "default": 0.13}
# The CUDA context, outside the allocator: 0.3-0.45 GB bare with lazily loaded modules (CUDA >= 11.7, PyTorch's
# default), more as a run loads its kernels (cuBLAS, attention, the optimizer's); before 11.7 over 1 GB. An estimate
# until benchmarks/gpu_proof.sh measures it on a card (memory.json, `context_bytes`).
CUDA_CONTEXT_BYTES = 750 * 10**6
ARCHS = ("sm70", "sm75", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120")


def parse_arch(text: str) -> tuple[int, int]:
    """'sm75' / 'sm_75' / '7.5' -> (7, 5): a CUDA compute capability."""
    s = text.strip().lower().removeprefix("sm").lstrip("_")
    major, _, minor = s.partition(".") if "." in s else (s[:-1], "", s[-1:])
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"--gpu_arch {text!r} is not a compute capability: write e.g. {', '.join(ARCHS)} or 8.6")
    return int(major), int(minor)


def detected_arch() -> tuple[int, int]:
    """This machine's first GPU's compute capability; sm80 without one (where the plan is for a card elsewhere)."""
    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (8, 0)


def arch_name(arch: tuple[int, int]) -> str:
    return f"sm{arch[0]}{arch[1]}"


def has_bfloat16(arch: tuple[int, int]) -> bool:
    """Native bfloat16 (tensor cores, the fused attention kernels) starts at Ampere, sm80."""
    return arch >= (8, 0)


def attention_kernel(dtype: torch.dtype, arch: tuple[int, int]) -> str:
    """The SDPA kernel a card of `arch` runs in `dtype` (PyTorch's sdp_utils): flash from sm80 in float16 and
    bfloat16; the memory-efficient kernel from sm50 in float16 and float32, in bfloat16 from sm80; else math."""
    if arch >= (8, 0):
        return "flash" if dtype in (torch.float16, torch.bfloat16) else "efficient"
    return "efficient" if dtype in (torch.float16, torch.float32) else "math"


def cublas_workspace_bytes(arch: tuple[int, int]) -> int:
    """cuBLAS's and cuBLASLt's workspaces on the run's one stream, held by the allocator for the process's life:
    PyTorch's default CUBLAS_WORKSPACE_CONFIG, :4096:8 (32 MiB) from Hopper (sm90), else :4096:2:16:8 (8.1 MiB)."""
    per_handle = 4096 * 1024 * 8 if arch >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8
    return 2 * per_handle


def expandable_segments(environ=os.environ) -> bool:
    """Whether a run started in `environ` allocates with expandable segments: `use_expandable_segments` sets them
    unless PYTORCH_CUDA_ALLOC_CONF (or PYTORCH_ALLOC_CONF) is set, and then it says."""
    conf = environ.get("PYTORCH_CUDA_ALLOC_CONF", environ.get("PYTORCH_ALLOC_CONF"))
    return conf is None or "expandable_segments:true" in conf.replace(" ", "").lower()


def use_expandable_segments(environ=os.environ) -> bool:
    """Before CUDA initialises: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the user set an allocator
    configuration (theirs is kept). The allocator reads it once, when CUDA initialises, so once it has (a notebook
    that used the GPU already) nothing is changed. Returns whether the allocator will use them."""
    user = "PYTORCH_CUDA_ALLOC_CONF" in environ or "PYTORCH_ALLOC_CONF" in environ
    if user:
        return expandable_segments(environ)
    if torch.cuda.is_initialized():
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True


def card_spend(p: Plan, arch: tuple[int, int] = (8, 0), expandable: bool = True,
               context: int = CUDA_CONTEXT_BYTES) -> dict:
    """What a card spends on `p`'s phases, by term: each phase's allocated peak, the allocator's blocks beyond it
    (`ALLOCATOR_OVERHEAD`), cuBLAS's workspaces and the CUDA context (0: already spent, as on a card whose free
    memory is measured); `peak` the largest phase's total."""
    factor = ALLOCATOR_OVERHEAD["expandable_segments" if expandable else "default"]
    phases = {}
    for phase, allocated in (("rollout", p.static + p.rollout), ("update", p.static + p.update)):
        terms = {"allocated": allocated, "allocator": math.ceil(factor * allocated),
                 "cublas_workspace": cublas_workspace_bytes(arch), "cuda_context": context}
        phases[phase] = {**terms, "total": sum(terms.values())}
    return {"allocator_setting": "expandable_segments" if expandable else "default", "allocator_factor": factor,
            "gpu_arch": arch_name(arch), **phases, "peak": max(v["total"] for v in phases.values())}


def halvings(size: int) -> list[int]:
    """size, size/2, ... 1: the sizes the out-of-memory fallbacks step through (`resilience`)."""
    out = [size]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def choose_sizes(cfg: TrainConfig, shape: ModelShape, memory_bytes: int, seq: SequenceShape | None = None,
                 arch: tuple[int, int] = (8, 0), expandable: bool = True,
                 context: int = CUDA_CONTEXT_BYTES) -> tuple[int, int, Plan]:
    """(rollout chunk, update micro-batch, the plan at those sizes): the largest of the out-of-memory fallbacks'
    sizes whose phase, with what the card spends beyond its allocations (`card_spend`), fits `memory_bytes`; 1
    when none does (the fallbacks then have the last word)."""
    def fits(r: int, m: int, phase: str) -> bool:
        return card_spend(plan(cfg, shape, seq, r, m, arch=arch), arch, expandable, context)[phase]["total"] <= memory_bytes

    chunk = next((r for r in halvings(cfg.generation_batch_size) if fits(r, 1, "rollout")), 1)
    micro = next((m for m in halvings(cfg.training_batch_size) if fits(chunk, m, "update")), 1)
    return chunk, micro, plan(cfg, shape, seq, chunk, micro, arch=arch)


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


def format_plan(p: Plan, spend: dict | None = None, title: str = "") -> str:
    """The plan as a table: each term, each phase's peak, in GB; with `spend` (`card_spend`) what the card spends
    on each phase beyond it."""
    t = p.terms
    extra = lambda *names: "".join(f", {k.replace('_', ' ')} %.2f" % (t[k] / GB) for k in names if t[k])  # noqa: E731
    rows = [("static", p.static, "weights %.2f, adapter %.3f, optimizer %.3f" % tuple(
        t[k] / GB for k in ("weights", "adapter", "optimizer")) + extra("cuda_graph_pool")),
            (f"rollout, {p.rollout_rows} rows", p.static + p.rollout,
             "KV cache %.2f, kept logits %.2f, step transient %.2f, oracle %.2f" % tuple(
                 t[k] / GB for k in ("kv_cache", "kept_logits", "rollout_transient", "oracle")) +
             extra("math_attention")),
            (f"update, micro-batch {p.micro_batch}", p.static + p.update,
             "activations %.2f, loss buffers %.2f, the batch's kept logits %.2f, gradients %.3f" % tuple(
                 t[k] / GB for k in ("activations", "loss_buffers", "batch_kept_logits", "gradients")) +
             extra("compile_kv_pool", "math_attention_update"))]
    lines = [title] if title else []
    header = "| phase | allocated (GB) | terms (GB) |"
    lines += [header + (" on the card (GB) |" if spend else ""), "|---|---|---|" + ("---|" if spend else "")]
    for name, total, what in rows:
        phase = name.split(",")[0]
        card = ""
        if spend and phase in spend:
            x = spend[phase]
            card = " %.2f (allocator %.2f, context %.2f, cuBLAS %.2f) |" % (
                x["total"] / GB, x["allocator"] / GB, x["cuda_context"] / GB, x["cublas_workspace"] / GB)
        elif spend:
            card = " |"
        lines.append(f"| {name} | {total / GB:.2f} | {what} |{card}")
    return "\n".join(lines)


def largest_batch(cfg: TrainConfig, shape: ModelShape, memory_bytes: int, arch: tuple[int, int], expandable: bool,
                  context: int = CUDA_CONTEXT_BYTES) -> dict | None:
    """The largest generation batch (halving from the config's) whose rollout and update fit `memory_bytes` at some
    chunk and micro-batch, and the sizes: what fits a card the config's batch does not; None if none does."""
    for batch in halvings(cfg.generation_batch_size):
        if batch % cfg.trajectories_per_article:
            continue
        local = cfg.replace(generation_batch_size=batch, training_batch_size=min(batch, cfg.training_batch_size))
        chunk, micro, p = choose_sizes(local, shape, memory_bytes, arch=arch, expandable=expandable, context=context)
        spend = card_spend(p, arch, expandable, context)
        if spend["peak"] <= memory_bytes:
            return {"generation_batch_size": batch, "rollout_chunk": chunk, "micro_batch": micro,
                    "card_peak": spend["peak"]}
    return None


def memory_report(cfg: TrainConfig, shape: ModelShape, memory_bytes: int, as_json: bool = False,
                  cards: tuple[int, ...] = (24 * 10**9, 80 * 10**9), arch: tuple[int, int] = (8, 0),
                  expandable: bool | None = None) -> str:
    """`python -m attnrl_core memory`: the plan at the config's sizes with what a card of compute capability `arch`
    and `memory_bytes` spends beyond it (`card_spend`; `expandable` default: what a run started here would use), the
    sizes chosen for it, what `evaluate` (its defaults: chunks of 32 rows, no kept logits, the oracle) peaks at, and
    the sizes for `cards`. Where the card has no bfloat16 and the plan is in bfloat16: that `train` refuses it, and
    the largest batch that fits in float16 and in float32."""
    expandable = expandable_segments() if expandable is None else expandable
    at_config = plan(cfg, shape, arch=arch)
    spend = card_spend(at_config, arch, expandable)
    chunk, micro, chosen = choose_sizes(cfg, shape, memory_bytes, arch=arch, expandable=expandable)
    chosen_spend = card_spend(chosen, arch, expandable)
    evaluation = plan(cfg, shape, rollout_rows=min(32, cfg.generation_batch_size), keep_query_logits=False,
                      oracle=True, arch=arch)
    evaluation_card = card_spend(evaluation, arch, expandable)["rollout"]["total"]
    others = {f"{c / GB:.0f}GB": choose_sizes(cfg, shape, c, arch=arch, expandable=expandable)[:2] for c in cards}
    refused = shape.dtype == torch.bfloat16 and not has_bfloat16(arch)
    fits = {name: largest_batch(cfg, dataclasses.replace(shape, dtype=dtype), memory_bytes, arch, expandable)
            for name, dtype in (("float16", torch.float16), ("float32", torch.float32))} if refused else None
    kernel = attention_kernel(shape.dtype, arch)
    if as_json:
        out = {"shape": {**asdict(shape), "dtype": str(shape.dtype)}, "gpu_memory": memory_bytes,
               "gpu_arch": arch_name(arch), "attention_kernel": kernel,
               "allocator_setting": spend["allocator_setting"],
               "plan": {**at_config.as_dict(), "card": spend},
               "chosen": {"rollout_chunk": chunk, "micro_batch": micro,
                          "plan": {**chosen.as_dict(), "card": chosen_spend}},
               "evaluate_peak": evaluation.static + evaluation.rollout, "evaluate_card_peak": evaluation_card,
               "other_cards": {k: {"rollout_chunk": r, "micro_batch": m} for k, (r, m) in others.items()}}
        if refused:
            out["refused"] = refused_message(arch)
            out["fits"] = fits
        return json.dumps(out)
    title = (f"{cfg.preset} at its sizes ({shape.layers} layers, vocabulary {shape.vocab}, {shape.dtype}; gradient "
             f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; {arch_name(arch)}, {kernel} attention; "
             f"allocator {spend['allocator_setting']} (+{spend['allocator_factor']:.0%})):")
    lines = [format_plan(at_config, spend, title),
             f"evaluate (chunks of {evaluation.rollout_rows} rows, oracle): allocated "
             f"{(evaluation.static + evaluation.rollout) / GB:.2f} GB, on the card {evaluation_card / GB:.2f} GB"]
    if refused:
        lines.append(refused_message(arch))
        for name, fit in fits.items():
            lines.append(f"  --dtype {name}: " + ("nothing fits" if fit is None else
                         f"generation batch {fit['generation_batch_size']}, rollout chunk {fit['rollout_chunk']}, "
                         f"micro-batch {fit['micro_batch']}; {fit['card_peak'] / GB:.2f} GB on the card"))
        return "\n".join(lines)
    lines.append(f"for {memory_bytes / GB:.1f} GB: rollout chunk {chunk}, update micro-batch {micro} "
                 f"(accumulation x{cfg.training_batch_size // micro}); {chosen_spend['peak'] / GB:.2f} GB on the card "
                 f"({chosen.peak / GB:.2f} allocated)")
    lines += [f"for {k}: rollout chunk {r}, update micro-batch {m}" for k, (r, m) in others.items()]
    return "\n".join(lines)


def refused_message(arch: tuple[int, int], device_name: str = "") -> str:
    """The one line `train` stops with on a card without bfloat16 (before the model loads)."""
    card = f"{device_name} ({arch_name(arch)})" if device_name else arch_name(arch)
    return (f"{card} has no bfloat16 (it needs sm80+): use --dtype float16 (the same memory; no loss scaling here, a "
            f"non-finite step is skipped) or --dtype float32 at a smaller --generation_batch_size (see `python -m "
            f"attnrl_core memory --gpu_arch {arch_name(arch)}`)")
