"""Experiment trackers for `--report_to`: send each episode's metrics.jsonl row, and the run's config, to
TensorBoard, Trackio and/or Weights & Biases.

The trackers are optional extras (`pip install -e '.[tracking]'`). This module imports only the standard
library at import time, and nothing from attnrl_core, so `parse_report_to` can check the CLI value before the
model loads; each tracker package is imported lazily by `Trackers` when a run actually asks for it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import uuid
from pathlib import Path

TRACKERS = ("tensorboard", "trackio", "wandb")
# The pip package (also the import name) each tracker needs; the `tracking` extra lists all three.
PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
PROJECT = "attnrl"


def _installed(module: str) -> bool:
    # find_spec locates the package without importing it: wandb/trackio imports take seconds.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # broken install, or a module in sys.modules with no spec
        return False


def parse_report_to(value: str) -> list[str]:
    """`"none"` or `""` -> []; otherwise the comma-separated tracker names, validated and de-duplicated."""
    names = [n.strip().lower() for n in (value or "").split(",")]
    names = list(dict.fromkeys(n for n in names if n))  # drop empties ("tensorboard,") and repeats
    if names == ["none"] or not names:
        return []
    if "none" in names:
        raise ValueError(f"report_to: 'none' cannot be combined with trackers ({value!r})")
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}: must be none or a comma-separated list of "
                             f"tensorboard, trackio, wandb")
        pkg = PACKAGES[name]
        if not _installed(pkg):
            raise ValueError(f"report_to={name} needs the {pkg} package: pip install -e '.[tracking]' "
                             f"(or pip install {pkg})")
    return names


def _hparam(v):
    # TensorBoard's hparams plugin takes only bool/int/float/str; anything else is shown as its JSON.
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)


class Trackers:
    """The open trackers of one run. `log` once per episode with the metrics.jsonl row; `close` at the end.

    Metric names are kept exactly as in metrics.jsonl (no prefixes), so they match the documented names.
    Numbers are logged (bools as 0/1); None, NaN/inf and non-numeric values are skipped.
    On `resume=True`, TensorBoard appends to the same directory (events from `first_step` on, left by the
    interrupted run, are purged), Trackio reopens the run of the same name, and W&B resumes the run whose id
    is stored in run_dir/"wandb_id". W&B follows WANDB_MODE (e.g. offline); nothing here forces online.
    """

    def __init__(self, names: list[str], run_dir: Path, config: dict, run_name: str | None = None,
                 resume: bool = False, first_step: int | None = None):
        self.names, self.run_dir = list(names), Path(run_dir)
        self._tb = self._wandb = self._trackio = None
        self._closed = False
        name = run_name or self.run_dir.name
        try:
            if "tensorboard" in self.names:
                self._open_tensorboard(config, resume, first_step)
            if "trackio" in self.names:
                import trackio  # lazy: optional extra
                trackio.init(project=PROJECT, name=name, config=config, resume="allow" if resume else "never")
                self._trackio = trackio
            if "wandb" in self.names:
                import wandb  # lazy: optional extra
                id_file = self.run_dir / "wandb_id"
                run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:12]
                self.run_dir.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id)  # so a later --resume continues this W&B run, not a new one
                self._wandb = wandb.init(project=PROJECT, name=name, config=config, dir=str(self.run_dir),
                                         id=run_id, resume="allow", allow_val_change=resume)
        except BaseException:
            self.close()  # don't leave the trackers opened so far dangling
            raise

    def _open_tensorboard(self, config: dict, resume: bool, first_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: needs the optional tensorboard package
        from torch.utils.tensorboard.summary import hparams
        purge = first_step if resume else None
        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        # Indented by 4 spaces: TensorBoard renders text as Markdown, and this keeps the JSON a code block.
        self._tb.add_text("config", "    " + text.replace("\n", "\n    "), global_step=purge or 0)
        # add_hparams would open a second writer in a timestamped subdirectory (a separate "run" in the UI);
        # writing the hparams summaries to this run's own file keeps config and metrics together.
        hp = {k: _hparam(v) for k, v in config.items() if v is not None}
        for summary in hparams(hp, {}):
            self._tb.file_writer.add_summary(summary, purge or 0)

    def log(self, metrics: dict, step: int) -> None:
        row = {k: v for k, v in metrics.items()
               if isinstance(v, numbers.Real) and math.isfinite(float(v))}
        if self._closed or not row:
            return
        if self._tb is not None:
            for k, v in row.items():
                self._tb.add_scalar(k, float(v), global_step=step)
        if self._trackio is not None:
            self._trackio.log(row, step=step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        """Flush and close every tracker; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._tb is not None:
            self._tb.close()  # close() flushes
        if self._trackio is not None:
            self._trackio.finish()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
