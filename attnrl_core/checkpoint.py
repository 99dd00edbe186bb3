"""Checkpoints: written to a temporary folder and renamed into place, verified by a manifest on load.

`checkpoints/episode-N/` holds the adapter in peft's standard format (`adapter_model.safetensors`,
`adapter_config.json`, loadable with `PeftModel.from_pretrained`), `optimizer.pt` (tensors only,
loaded with `weights_only=True`), `state.json` (episode, running statistics, data position, Python and
NumPy RNG states), `rng.safetensors` (torch CPU/CUDA RNG states) and `manifest.json` (size and
SHA-256 of every other file). Every file is fsynced before the folder is renamed into place, the
parent directory after; a checkpoint of the same episode is replaced by an exchange, so no kill leaves
fewer valid checkpoints than there were. Imports attnrl_core.files only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .files import fsync_dir, fsync_file, replace_dir

MANIFEST = "manifest.json"
log = logging.getLogger("attnrl")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able Python/NumPy states, torch states as tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, episode: int, model, optimizer, state: dict, keep_last: int = 0) -> Path:
    """Write `checkpoints/episode-{episode}` atomically; `state` must be JSON-able. Returns its path."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"episode-{episode}"
    for stale in root.glob(".tmp-episode-*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-episode-{episode}-{os.getpid()}"
    model.save_pretrained(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    plain_rng, tensor_rng = rng_state()
    (tmp / "state.json").write_text(json.dumps({**state, "episode": episode, "rng": plain_rng}))
    save_file(tensor_rng, tmp / "rng.safetensors")
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in files + [tmp / MANIFEST]:
        fsync_file(p)
    fsync_dir(tmp)
    replace_dir(tmp, final)  # a re-run of the same episode after a resume replaces it whole
    log.info("checkpoint %s written", final.name)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("episode-")
             and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file in the manifest is present with its size and hash, else what is wrong."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest is corrupt"
    for name, meta in manifest.items():
        p = Path(path) / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
            return f"{name} is truncated or altered"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`; broken ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path.name}: {problem}", stacklevel=2)
    return None


ADAPTER_SHAPE = ("r", "lora_alpha", "target_modules")  # what must match for the weights to mean the same


def _adapter_shape(config: dict) -> dict:
    targets = config.get("target_modules")
    return {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "target_modules": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets}


def load_adapter(path: Path, model) -> None:
    """Load a checkpoint's adapter weights into a model that has the same adapter attached.

    Refuses, with one line naming the checkpoint, an adapter whose rank, alpha or target modules differ
    from the attached one, and weights with missing or unexpected adapter keys: peft loads such a
    file silently (strict=False), which would leave the adapter untrained while calling it trained.
    """
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"checkpoint {path} has no adapter_config.json: it is not a peft adapter folder")
    stored = _adapter_shape(json.loads(config_file.read_text()))
    attached = _adapter_shape(vars(model.peft_config[model.active_adapter]))
    if stored != attached:
        diff = ", ".join(f"{k} {stored[k]!r} vs {attached[k]!r}" for k in ADAPTER_SHAPE if stored[k] != attached[k])
        raise ValueError(f"checkpoint {path} holds a different adapter ({diff} in the model): load it with the "
                         "run's own config.json")
    result = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not match the model's adapter: {len(missing)} adapter weights "
                         f"missing (e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[:1]}): load it with the run's own config and model")


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore adapter weights, optimizer state and RNG states; return the stored state dict."""
    path = Path(path)
    load_adapter(path, model)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    state = json.loads((path / "state.json").read_text())
    set_rng_state(state.pop("rng"), load_file(path / "rng.safetensors"))
    return state
