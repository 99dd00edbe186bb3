"""Shared fixtures: tiny random-weight Llama models with grouped-query attention (6 query heads,
2 KV heads) for speed, and the real embedded SmolLM2 tokenizer where tokenization is the point.

Under pytest-xdist (`make test`: two workers, whole files per worker) each worker computes on one core: it
registers as an attnrl process, so the runs it starts in-process or as children share the cores with the
other worker's (`host.share_cpu`), and its own torch, like the notebook kernels it starts, keeps one thread."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnrl_core.config import TrainConfig
from attnrl_core.data import KeyValueBatch, Separators, add_embeddings, sample_chunks, split_key_values
from attnrl_core.embeddings import key_embedding_fn
from attnrl_core.host import sharing_cpu
from attnrl_core.model import attach_adapter, gqa_attention

VOCAB = 320

# The files that take longest, first: xdist hands files to the workers in collection order, so the long
# ones start at once and the two workers finish close together (each name a file's basename).
LONGEST_FIRST = ("test_kill_points.py", "test_gpu_proof.py", "06_experiment.ipynb", "test_distributed.py",
                 "05_trajectory_analysis.ipynb",
                 "07_evaluation.ipynb", "test_reliability.py",
                 "04_training_run.ipynb", "test_evaluate.py", "test_experiment.py", "test_end_to_end.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    """In an xdist worker, from its start (before any test or notebook item): one thread, and registered."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # the notebook kernels and child processes this worker starts
    torch.set_num_threads(1)
    registered = contextlib.ExitStack()
    registered.enter_context(sharing_cpu(torch.device("cpu")))
    config.add_cleanup(registered.close)


def logits_tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """`assert_close` tolerances for the logits the rollout keeps against a teacher-forced pass of the same tokens.
    The two compute the same function in different orders (a cached pass one token at a time against one pass
    over the whole sequence: other matmul shapes, other reduction orders). In float32 they agree to ~1e-6; in
    bf16 every layer's activations are rounded to 8 significant bits (eps 2^-7) at different points, so the
    difference is a few eps of the logits' scale, however exact the float32 head that reads them: a fixed 1e-4
    cannot hold there (nor on CUDA, whose bf16 kernels round differently again)."""
    if dtype == torch.float32:
        return dict(rtol=1e-4, atol=1e-4)
    return dict(rtol=0, atol=4 * torch.finfo(dtype).eps * scale)


def tiny_llama(vocab_size: int = VOCAB, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=96, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, bos_token_id=1,
                         max_position_embeddings=1024)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(gqa_attention())  # the attention `load_base_model` gives the real model
    return model


def tiny_config(**overrides) -> TrainConfig:
    base = dict(num_kv_pairs=6, subset_fraction=0.5, generation_batch_size=4, training_batch_size=2,
                lora_dropout=0.0, tokens_per_key=5, tokens_per_value=4, tokens_per_query=3)
    return TrainConfig.from_preset("embedded", **{**base, **overrides})


def randomize_adapter(model, scale: float = 0.3, seed: int = 1) -> None:
    """LoRA B starts at zero (adapter = identity); give it weights so policy and base differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def policy():
    """Tiny GQA Llama with a LoRA adapter (dropout 0) whose weights are non-zero."""
    model = attach_adapter(tiny_llama(), tiny_config())
    randomize_adapter(model)
    return model


SEP = Separators(query=torch.tensor([5, 6]), response=torch.tensor([7, 8, 9]), bos=torch.tensor([1]))


def make_batch(model, cfg: TrainConfig, seed: int = 0) -> KeyValueBatch:
    g = torch.Generator().manual_seed(seed)
    B, N = cfg.generation_batch_size, cfg.num_kv_pairs
    tokens = torch.randint(10, VOCAB, (B, N * cfg.tokens_per_kv_pair), generator=g)
    keys, values = split_key_values(tokens, N, cfg.tokens_per_key, cfg.tokens_per_value)
    batch = KeyValueBatch(keys, values, sample_chunks(B, N, cfg.pool_size, g), [str(i) for i in range(B)],
                          [f"article {i}" for i in range(B)])
    return next(add_embeddings([batch], key_embedding_fn(model, torch.device("cpu"))))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (from the embedded model's cache; built on first use)."""
    from attnrl_core.model import load_tokenizer

    return load_tokenizer(TrainConfig.from_preset("embedded"))
