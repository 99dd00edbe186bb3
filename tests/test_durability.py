"""Run files are whole or absent: torn log lines are dropped, replaced files and checkpoints never
vanish, and an adapter that does not match its model is refused instead of loaded silently."""

import json
import os
import shutil

import pytest
import torch

import attnrl_core.checkpoint as checkpoint
import attnrl_core.files as files
from attnrl_core.checkpoint import latest_valid_checkpoint, load_adapter, save_checkpoint
from attnrl_core.files import append_jsonl, atomic_write_text, read_jsonl, truncate_jsonl
from attnrl_core.model import attach_adapter

from .conftest import randomize_adapter, tiny_config, tiny_llama


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, [{"episode": 1}, {"episode": 2}])
    with open(path, "a") as fh:
        fh.write('{"episode": 3, "rew')  # a kill in the middle of an append
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_jsonl(path) == [{"episode": 1}, {"episode": 2}]
    with pytest.warns(UserWarning):
        truncate_jsonl(path, 2)
    assert path.read_text() == '{"episode": 1}\n{"episode": 2}\n'  # the next append starts a clean line


def test_a_damaged_line_before_the_end_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"episode": 1}\n{oops\n{"episode": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no `except Exception` catches it."""


def test_atomic_write_leaves_the_old_file_when_killed_before_the_rename(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, '{"old": 1}')

    def killed(*args):
        raise Killed

    monkeypatch.setattr(files.os, "replace", killed)
    with pytest.raises(Killed):
        atomic_write_text(path, '{"new": 2}')
    assert json.loads(path.read_text()) == {"old": 1}


@pytest.fixture
def adapter_model():
    model = attach_adapter(tiny_llama(), tiny_config())
    randomize_adapter(model)
    return model


def _save(run_dir, model, episode=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return save_checkpoint(run_dir, episode, model, opt, {"stats": {}, "data_position": {}})


KILL_POINTS = {  # (module, function, which call): every file operation that replacing a checkpoint may do
    "rename into place": ("os", "rename", lambda args: str(args[1]).endswith("episode-3")),
    "remove the old folder": ("shutil", "rmtree", lambda args: str(args[0]).endswith("episode-3")),
    "remove the replaced copy": ("shutil", "rmtree", lambda args: ".tmp-episode-3" in str(args[0])),
}


@pytest.mark.parametrize("kill_at", sorted(KILL_POINTS))
def test_rewriting_a_checkpoint_never_leaves_fewer_valid_ones(kill_at, tmp_path, monkeypatch, adapter_model):
    """A checkpoint of the same episode written again (a resumed run redoing it) and killed at any file
    operation: episode-3 is still there and verifies, old or new."""
    _save(tmp_path, adapter_model)
    module, name, is_target = KILL_POINTS[kill_at]
    real = getattr({"os": os, "shutil": shutil}[module], name)

    def maybe_killed(*args, **kwargs):
        if is_target(args):
            raise Killed
        return real(*args, **kwargs)

    for mod in (checkpoint, files):
        monkeypatch.setattr(getattr(mod, module), name, maybe_killed)
    try:
        _save(tmp_path, adapter_model)
    except Killed:
        pass  # killed there; not reaching the operation at all is fine too
    monkeypatch.undo()
    assert latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoints" / "episode-3"


def test_adapter_with_missing_keys_is_refused(tmp_path, adapter_model):
    path = _save(tmp_path, adapter_model)
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "adapter_model.safetensors")
    save_file({k.replace("lora_A", "lora_X"): v for k, v in weights.items()}, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"checkpoint {path} does not match"):
        load_adapter(path, adapter_model)


def test_adapter_of_another_rank_or_targets_is_refused(tmp_path, adapter_model):
    path = _save(tmp_path, adapter_model)
    other = attach_adapter(tiny_llama(), tiny_config(lora_r=4))
    with pytest.raises(ValueError, match=r"different adapter \(r 8 vs 4"):
        load_adapter(path, other)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="target_modules"):
        load_adapter(path, adapter_model)


def test_a_matching_adapter_loads_exactly(tmp_path, adapter_model):
    path = _save(tmp_path, adapter_model)
    fresh = attach_adapter(tiny_llama(), tiny_config())
    load_adapter(path, fresh)
    want = {k: v for k, v in adapter_model.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
