"""What issue 25's diagnostics share (`choice_cost.py`, `choice_fit_one_batch.py`, `choice_predictability.py`):
one thread, seed 0, the embedded model with the config they ask for, and the training batches its run would see.
Imported by those scripts (run as `python research/NAME.py`, so this folder is on the path)."""
import torch

from attnrl_core.config import TrainConfig
from attnrl_core.corpus import DataPosition
from attnrl_core.data import encode_separators
from attnrl_core.distributed import Ranks
from attnrl_core.embeddings import key_embedding_fn
from attnrl_core.model import head_geometry, load_policy, resolve_device
from attnrl_core.run import _rank_batches


def embedded_setup(**overrides):
    """(cfg, model, sep, geo, batches) for `TrainConfig.from_preset("embedded", **overrides)` on one thread with
    seed 0: `batches` yields (global batch, this process's rows) as a run starting at episode 1 would."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = TrainConfig.from_preset("embedded", **overrides)
    device = resolve_device(cfg)
    model, tok = load_policy(cfg, device, None)
    embed = key_embedding_fn(model, device, layer=cfg.similarity_layer, how=cfg.similarity_readout)
    return (cfg, model, encode_separators(tok), head_geometry(model),
            _rank_batches(cfg, tok, embed, DataPosition(), Ranks()))
