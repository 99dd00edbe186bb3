"""A decode loop a GPU can run ahead on: no value read back to the host and no host-to-device copy inside it, the
policy/base split without peft's per-call list indexing, with the same numbers as peft's mixed-adapter batch.

The decode steps run on the `meta` device (shapes only), watched by two modes: a function mode sees Python-level
indexing with host lists and tensors created from host data or moved onto the device; a dispatch mode sees every
read of a value (`.item()`, `bool()`, ...) and every copy between the host and the device."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM

from attnrl_core.decoding import BufferedCache, DecodeStep, forward_logits, sample_tokens
from attnrl_core.memtrace import cuda_attention
from attnrl_core.model import attach_adapter, gqa_attention, policy_and_base, row_adapter

from .conftest import VOCAB, tiny_config, tiny_llama

_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.is_nonzero.default}


def _on_host(index) -> bool:
    """An index that lives on the host: a list or tuple of numbers, or a CPU tensor with elements."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, list) or (isinstance(p, torch.Tensor) and p.device.type == "cpu" and p.dim() > 0)
               for p in parts)


class _HostFunctions(TorchFunctionMode):
    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and args[0].device.type != "cpu" \
                and _on_host(args[1]):
            self.found.append(f"indexing with host data ({func.__name__})")
        if func in (torch.tensor, torch.as_tensor) and str(kwargs.get("device", "cpu")) != "cpu":
            self.found.append(f"{func.__name__} from host data onto the device")
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args[0].device.type == "cpu" and any(
                (isinstance(a, (str, torch.device)) and str(a) != "cpu") or
                (isinstance(a, torch.Tensor) and a.device.type != "cpu") for a in (*args[1:], *kwargs.values())):
            self.found.append("a host tensor moved onto the device")
        return func(*args, **kwargs)


class _HostDispatch(TorchDispatchMode):
    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if func in _READS and tensors[0].device.type != "cpu":
            self.found.append(f"a value read back ({func})")
            return True if tensors[0].dtype == torch.bool else 0
        devices = {t.device.type for t in tensors if t.dim() > 0}
        if func is torch.ops.aten.copy_.default and len(devices) > 1:
            self.found.append(f"a copy between host and device ({func})")
        if func is torch.ops.aten._to_copy.default and str((kwargs or {}).get("device", tensors[0].device)) != \
                str(tensors[0].device):  # one tensor in: the target device is a keyword
            self.found.append(f"a copy between host and device ({func})")
        return func(*args, **(kwargs or {}))


def _watched(fn) -> list[str]:
    found: list[str] = []
    with _HostFunctions(found), _HostDispatch(found):
        fn()
    return found


def _meta_policy():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama().config).eval()
    model.set_attn_implementation(gqa_attention())
    return attach_adapter(model, tiny_config())


def test_decode_steps_read_nothing_back_and_copy_nothing_in():
    model, B = _meta_policy(), 4
    both = policy_and_base(model, B, torch.device("meta"))
    cache = BufferedCache(model.config, 64)
    prompt = torch.zeros(2 * B, 10, dtype=torch.long, device="meta")
    with torch.inference_mode(), cuda_attention():
        forward_logits(model, prompt, cache, 1, both)  # the context, read before the loop
        for greedy in (True, False):
            found = _watched(lambda: sample_tokens(model, cache, prompt[:, :2], 3, 1.0, greedy, both, keep_logits=B))
            assert found == [], found
        # the fixed-shape steps of `--compile` (the position a tensor made on the device, the whole buffers read)
        static = DecodeStep(compiled=False, device=torch.device("meta"))
        cache = static.cache(model.config, 64)
        forward_logits(model, prompt, cache, 1, both)
        found = _watched(lambda: sample_tokens(model, cache, prompt[:, :2], 3, 1.0, False, both, keep_logits=B,
                                               decode_step=static))
        assert found == [] and cache.get_seq_length() == 14, (found, cache.get_seq_length())
        # the guard sees what peft's own mixed-adapter batch does: each LoRA layer indexes its input with lists
        names = [model.active_adapter] * B + ["__base__"] * B
        found = _watched(lambda: model(input_ids=prompt[:, :1], cache=cache, use_cache=True, adapter_names=names))
        assert any("indexing with host data" in f for f in found), found


def test_row_adapter_gives_peft_mixed_batch_numbers(policy):
    """The adapter per row by a mask on the LoRA delta: the same logits as peft's `adapter_names` batch, the
    policy's rows as with the adapter on every row, the base model's as with it off."""
    B, ids = 3, torch.randint(10, VOCAB, (6, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_mixed = policy(input_ids=ids, adapter_names=[policy.active_adapter] * B + ["__base__"] * B).logits
        with row_adapter(policy, policy_and_base(policy, B)):
            ours = policy(input_ids=ids).logits
        on = policy(input_ids=ids[:B]).logits
        with policy.disable_adapter():
            off = policy(input_ids=ids[B:]).logits
            base_first = policy(input_ids=ids[:B]).logits
        after = policy(input_ids=ids).logits  # the adapter's factor is back on every row
    torch.testing.assert_close(ours, peft_mixed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[:B], on, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[B:], off, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[B:], policy(input_ids=ids[B:]).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[:B], base_first, atol=1e-3)  # the adapter does change the policy's rows
