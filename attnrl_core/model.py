"""Base model + one LoRA adapter, head geometry, and the adapter on/off switch (whole model or per row);
the base model loads with SDPA attention that passes grouped KV heads to the CPU kernel as they are,
and, in bf16/fp16, with its LM head computed in float32.

The base model is the same weights with the adapter disabled (`base_model(model)`), never a second
copy (TRL's reference-model trick). Imports attnrl_core.config and attnrl_core.assets only.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .assets import embedded_model_dir
from .config import EMBEDDED_MODEL, TrainConfig


def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available: use --device cpu or --device auto")
    return torch.device(cfg.device)


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _source(name: str) -> str:
    """Folder or Hub id to load from; the embedded model is converted to a cached folder on first use."""
    if name == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    return name


def load_tokenizer(cfg: TrainConfig):
    return AutoTokenizer.from_pretrained(_source(cfg.tokenizer_name or cfg.model_name))


# -- attention ---------------------------------------------------------------------------------------
GQA_SDPA = "sdpa_gqa"


def _sdpa_gqa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                        **kwargs):
    """transformers' SDPA attention, except that a masked read hands the grouped key/value heads to the kernel
    as they are, never repeated.

    With a mask, transformers repeats the key/value heads first (CUDA's fast kernels need that; for one query
    token it folds the groups into the query instead, but not while `torch.compile` traces), which copies the
    whole KV cache in every layer each time the rollout reads a prompt or a value onto a cache (its cost is in
    BENCHMARKS.md), and at every fixed-shape decode step of `--compile`, whose mask covers the whole buffer. One
    query token: the groups are folded into the query ([B, Hq, 1, D] -> [B, Hkv, groups, D], the same products,
    any device, traced or not). Several on the CPU: the flash kernel takes the groups directly (`enable_gqa`).
    The same result either way (tested).
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is not None and groups > 1 and kwargs.get("position_bias") is None and dropout == 0.0:
        B, H, Q, D = query.shape
        if Q == 1:
            out = F.scaled_dot_product_attention(query.reshape(B, H // groups, groups, D), key, value,
                                                 attn_mask=attention_mask, scale=scaling)
            return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None
        if query.device.type == "cpu":
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                                 enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def gqa_attention() -> str:
    """Register `_sdpa_gqa_attention` (with SDPA's masks) with transformers; returns its name for
    `attn_implementation` / `set_attn_implementation`."""
    AttentionInterface.register(GQA_SDPA, _sdpa_gqa_attention)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)
    return GQA_SDPA


def load_base_model(cfg: TrainConfig, device: torch.device | None = None) -> nn.Module:
    device = device or resolve_device(cfg)
    model = AutoModelForCausalLM.from_pretrained(_source(cfg.model_name), dtype=resolve_dtype(cfg, device),
                                                 attn_implementation=gqa_attention())
    return float32_head(model.to(device)).eval()


def float32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] @ b [k, n] of reduced-precision matrices with float32 output and accumulation. On CUDA (and
    `meta`) `torch.mm`'s `out_dtype`, reading a and b as they are; the CPU has no such kernel, so there the
    operands are upcast first (exact: bf16 values are float32 values)."""
    if a.device.type == "cpu":
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32)


class _Float32Logits(torch.autograd.Function):
    """hidden [..., H] @ weight [V, H]^T with float32 logits; the gradient reaches `hidden` in its own dtype (as a
    reduced-precision head's would), never the frozen weight. `torch.mm`'s `out_dtype` has no derivative."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.hidden_dtype = hidden.dtype
        out = float32_matmul(hidden.reshape(-1, hidden.shape[-1]), weight.t())
        return out.view(*hidden.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype) @ weight
        return g.view(*grad.shape[:-1], weight.shape[1]).to(ctx.hidden_dtype), None


class Float32Head(nn.Module):
    """The LM head computed with float32 logits from a (bf16 or fp16) hidden state and weight.

    Rewards are differences of mean value log-probs of the order of 1e-2, and so are the KL and
    REINFORCE terms; logits rounded to bf16 (a spacing of 0.125 above 16) would add noise of that size
    before any float32 log-softmax. On CUDA the head's own weight is read in its dtype by a GEMM with float32
    output (`float32_matmul`): the products of bf16 values are exact in float32, so the logits are those of an
    exact float32 head but for the order of summation, with no float32 copy of the weight (4 V H bytes: 1.6 GB
    at Llama-3.2-3B). On the CPU, which has no such GEMM and where reduced precision only serves tests, the
    weight is upcast once into a buffer (`weight_fp32`) and `F.linear(h.float(), W32)` runs as before.
    """

    def __init__(self, head: nn.Linear):
        super().__init__()
        assert head.bias is None, "Llama-family heads have no bias"
        self.out_features = head.out_features
        on_cpu = head.weight.device.type == "cpu"
        # a buffer of its own name: re-tying the embeddings (`tie_weights`) cannot swap it back to bf16
        self.register_buffer("weight_fp32", head.weight.detach().float().clone() if on_cpu else None, persistent=False)
        self.weight = None if on_cpu else head.weight  # the head's (often the tied embeddings') own, frozen

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.weight_fp32 is not None:
            return F.linear(hidden.float(), self.weight_fp32)
        return _Float32Logits.apply(hidden, self.weight)


def float32_head(model: nn.Module) -> nn.Module:
    """Give a model in reduced precision a `Float32Head` (no-op in float32); returns the model."""
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight.dtype != torch.float32:
        model.set_output_embeddings(Float32Head(head))
    return model


def attach_adapter(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap `model` with one LoRA adapter; only the adapter's parameters require gradients."""
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` inside get_peft_model: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name
    return peft_model.eval()


def load_policy(cfg: TrainConfig, device: torch.device | None = None, tokenizer=None):
    """(policy model with adapter, tokenizer) for a config; pass a tokenizer already loaded to reuse it."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    model = attach_adapter(load_base_model(cfg, device), cfg)
    set_gradient_checkpointing(model, bool(cfg.gradient_checkpointing))
    return model, tokenizer


@contextlib.contextmanager
def base_model(model: nn.Module):
    """The pre-trained model: the adapter disabled for the duration (no-op for a model without one)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def policy_and_base(model: nn.Module, B: int, device: torch.device | None = None, base_copies: int = 1
                    ) -> torch.Tensor | None:
    """Which rows of one batch of (1 + base_copies) B rows the adapter applies to: [(1 + base_copies) B] float, 1 on
    the first B (the policy), 0 on the rest (the pre-trained model, `base_copies` blocks of B), for `row_adapter`.
    None for a model without an adapter, where all blocks are the same model anyway (as in `base_model`)."""
    if not hasattr(model, "disable_adapter"):
        return None
    return torch.cat([torch.ones(B, device=device), torch.zeros(base_copies * B, device=device)])


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    """The model's LoRA-wrapped layers (found once, then kept on the model)."""
    layers = getattr(model, "_attnrl_lora_layers", None)
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        model._attnrl_lora_layers = layers
    return layers


@contextlib.contextmanager
def row_adapter(model: nn.Module, rows: torch.Tensor | None):
    """While inside, the adapter's output is multiplied per row by `rows` [n] (1: the policy, 0: the pre-trained
    model), so one forward pass serves both halves of a rollout batch.

    peft's own mixed-adapter batch (`adapter_names`) indexes each LoRA layer's input with Python lists of rows
    (a host-to-device copy per layer on a GPU) and registers a hook per layer on every call. Here each layer's
    `scaling` (the LoRA factor alpha / r its delta is multiplied by) becomes that factor times a [n, 1, 1] mask on
    the device for the duration: the delta of a base row is multiplied by 0 (exactly nothing added), a policy
    row's by the same factor as before. `rows` None: no change."""
    if rows is None:
        yield
        return
    name = model.active_adapter
    layers = _lora_layers(model)
    mask = rows[:, None, None]
    saved = [layer.scaling[name] for layer in layers]
    scaled = {factor: mask * factor for factor in set(saved)}
    try:
        for layer, factor in zip(layers, saved):
            layer.scaling[name] = scaled[factor]
        yield
    finally:
        for layer, factor in zip(layers, saved):
            layer.scaling[name] = factor


def set_gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations (`--gradient_checkpointing`):
    the update's memory per trajectory falls to each layer's input, for about one more forward pass of time.
    transformers' own switch, non-reentrant (the adapter's gradient needs no grad-requiring input); it acts in
    training mode only, so rollouts (eval mode, no gradient) are unchanged."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # transformers also makes the embeddings' output require a gradient, which only reentrant checkpointing
        # needs, and which fails on the rollout's inference tensors
        inner.disable_input_require_grads()
    else:
        inner.activation_checkpointing_disable()


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# -- head geometry ----------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model.layers


def attention_layer(model: nn.Module, layer: int = -1) -> nn.Module:
    """Decoder layer `layer`'s self-attention (Python indexing: -1 is the last); its q_proj is LoRA-wrapped
    when the adapter targets it. An index outside the model is a one-line error."""
    layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"similarity_layer={layer} is outside the model's {len(layers)} layers: use "
                         f"-{len(layers)}..{len(layers) - 1}")
    return layers[layer].self_attn


def last_attention(model: nn.Module) -> nn.Module:
    """The last decoder layer's self-attention (SPEC's similarity layer)."""
    return attention_layer(model, -1)


@dataclass(frozen=True)
class HeadGeometry:
    num_query_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads


def _out_features(module: nn.Module) -> int:
    base = getattr(module, "base_layer", module)  # peft wraps targeted Linear layers
    return base.out_features


def head_geometry(model: nn.Module) -> HeadGeometry:
    """Read from the last layer's q_proj/k_proj output sizes and the config, checked against each other."""
    attn = last_attention(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_out, k_out = _out_features(attn.q_proj), _out_features(attn.k_proj)
    assert q_out % head_dim == 0 and k_out % head_dim == 0, (q_out, k_out, head_dim)
    geo = HeadGeometry(q_out // head_dim, k_out // head_dim, head_dim)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    assert (geo.num_query_heads, geo.num_kv_heads) == (config.num_attention_heads, kv_heads), (geo, config)
    assert geo.num_query_heads % geo.num_kv_heads == 0, geo
    return geo

