"""The single source of parameters: `TrainConfig`, its presets, and its command-line form.

Every SPEC.md parameter is a field with its default and a help string; the help strings make
`python -m attnrl_core train --help` (the command line's flags are built in `__main__`), notebooks' `parameters` cells mirror the field names, and a run
directory's `config.json` is `TrainConfig.to_dict()`. Imports attnrl_core.tracking only (to check
`report_to` without importing any tracker).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .tracking import parse_report_to

EMBEDDED_MODEL = "embedded:smollm2-135m"
EMBEDDED_DATASET = "embedded:gensim-enwiki"
HUB_DATASETS = {"wikimedia/wikipedia": "20231101.en", "wikipedia": "20220301.en"}


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """All parameters of a run. Invalid values raise `ValueError` naming the field on construction."""

    preset: str = _f("llama-3.2-3b", "preset the defaults came from: embedded | llama-3.2-3b")
    # --- data -------------------------------------------------------------------------------
    tokens_per_key: int = _f(20, "tokens in each key chunk")
    tokens_per_value: int = _f(20, "tokens in each value chunk")
    tokens_per_query: int = _f(20, "tokens the policy writes after ' Query:' at every step")
    num_kv_pairs: int = _f(16, "non-overlapping key-value pairs cut from each article (pair 0 is the in-context example)")
    subset_fraction: float = _f(0.25, "fraction of pairs put in a trajectory's pool; steps = ceil(fraction * num_kv_pairs)")
    dataset_name: str = _f("wikimedia/wikipedia", "Hub dataset ('wikimedia/wikipedia' or SPEC's 'wikipedia'), "
                           "'embedded:gensim-enwiki', or a local parquet/jsonl file or a folder of them or of "
                           "plain-text files (one article per file)")
    dataset_config: str = _f("20231101.en", "dataset configuration ('20231101.en'; '20220301.en' for 'wikipedia')")
    dataset_split: str = _f("train", "dataset split to stream")
    text_column: str = _f("text", "column holding an article's text (local tables whose columns are named otherwise)")
    id_column: str = _f("id", "column holding an article's id (the held-out split hashes it)")
    eval_fraction: float = _f(0.1, "fraction of articles (by a hash of their id) held out of training for `evaluate`")
    max_scan_articles: int = _f(10_000, "articles scanned without finding a long-enough one before giving up")
    max_train_articles: int = _f(0, "train on the first N long-enough training articles only, cycled (the overfit "
                                 "check); 0 uses them all")
    skip_train_articles: int = _f(0, "with max_train_articles N: skip the first K long-enough training articles "
                                  "and cycle the next N (an overfit check on other articles)")
    # --- model ------------------------------------------------------------------------------
    model_name: str = _f("meta-llama/Llama-3.2-3B", "base model on the Hub or 'embedded:smollm2-135m'")
    tokenizer_name: str = _f("", "tokenizer name; empty means the model's own")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (auto: CUDA when available, else CPU)")
    dtype: str = _f("auto", "auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU)")
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(16, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout (active in the update phase only)")
    lora_target_modules: str = _f("q_proj,v_proj", "comma-separated module names the adapter wraps")
    gradient_checkpointing: int = _f(1, "1: the update recomputes each decoder layer in its backward pass instead of "
                                     "keeping its activations (less memory per trajectory, one more forward pass of "
                                     "update time; the same numbers)")
    compile: int = _f(0, "1: the rollout's single-token decode steps run with fixed shapes (the KV cache allocated once "
                      "per run, the position a tensor) and are compiled once with torch.compile (fullgraph; CUDA "
                      "graphs on CUDA); the first rollout pays the compile time. 0: plain forward passes")
    # --- policy and selection ---------------------------------------------------------------
    temperature: float = _f(1.0, "similarity temperature: scores are multiplied by it (larger = sharper)")
    query_temperature: float = _f(1.0, "sampling temperature of query tokens (policy and counterfactual)")
    similarity_layer: int = _f(-1, "decoder layer whose q_proj/k_proj embed queries and keys (-1: the last, SPEC's)")
    similarity_readout: str = _f("mean", "how a query's and a key's tokens are compared: mean (SPEC's: the average "
                                 "projection of each) | last (the last token's projection of each) | max (late "
                                 "interaction, ColBERT's: for each query token its best key token, averaged)")
    # --- RL ---------------------------------------------------------------------------------
    learning_rate: float = _f(2e-4, "8-bit Adam learning rate")
    max_grad_norm: float = _f(1.0, "gradient norm clip")
    kl_beta: float = _f(0.1, "KL penalty coefficient beta")
    warmup_trajectories: int = _f(15, "trajectories that only feed the reward statistics before any is selected")
    filter_num_sd: float = _f(1.0, "a trajectory is selected when its reward > mean + filter_num_sd * SD")
    generation_batch_size: int = _f(64, "trajectories rolled out together per episode")
    training_batch_size: int = _f(16, "selected trajectories per update micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    # --- research levers (each default is SPEC's method) -----------------------------------------
    choice_in_loss: int = _f(0, "1: a step's REINFORCE log-prob also includes log p(chosen pair | query) under the "
                             "similarity distribution, so the gradient reaches the selection (0: SPEC's, query tokens only)")
    value_nll_weight: float = _f(0.0, "adds this x the policy's mean NLL of the selected trajectories' values in their "
                                 "contexts (a change to SPEC's method: the model also learns the chunks it chose)")
    choice_target_weight: float = _f(0.0, "λ > 0 adds, over every rolled-out trajectory, λ x the sum over steps of "
                                     "KL(softmax(r_candidates / τ) || p_select): every pair left is scored at every "
                                     "step (the per-step oracle's pass) and the selection is trained toward the pairs "
                                     "that would have earned most, choice_target_steps extra optimizer steps per "
                                     "episode (REPLUG's LM-supervised retrieval; a change to SPEC's method; 0: off)")
    hindsight_weight: float = _f(0.0, "λ > 0 adds, over every rolled-out trajectory, λ x the policy's mean NLL of the "
                                 "best-scored pair's key (by choice_target_score, among the pairs left at that "
                                 "step) written as that step's query, hindsight_steps optimizer steps per episode: "
                                 "hindsight on the query (LeReT's), so the policy learns to write what the similarity "
                                 "retrieves "
                                 "(the per-step oracle's pass scores the pairs; a change to SPEC's method; 0: off)")
    hindsight_steps: int = _f(1, "optimizer steps of hindsight on the query per episode, each on the whole rolled-out "
                              "batch (its targets are fixed by the rollout's oracle pass, so repeated steps fit them)")
    choice_target_steps: int = _f(1, "optimizer steps of the selection objective per episode, each on the whole "
                                  "rolled-out batch (its target is fixed by the rollout, so repeated steps fit it)")
    choice_target_reach: str = _f("q_proj", "what the selection objective trains: q_proj (the adapter on the similarity "
                                  "layer's q_proj only) | below (also every adapter below it, which the language "
                                  "model's predictions share)")
    choice_target_score: str = _f("reward", "what choice_target_weight's target ranks the pairs left by: reward (SPEC's "
                                  "reward of each: the policy's value log-prob after its query less the base model's "
                                  "after a counterfactual query) | logprob (the policy's value log-prob alone, REPLUG's "
                                  "LM likelihood of each candidate: no counterfactual query's noise in the target)")
    choice_target_temperature: float = _f(0.1, "τ of choice_target_weight's target softmax(r_candidates / τ), in nats "
                                          "of the per-step reward (smaller = nearer the best pair alone)")
    counterfactual_samples: int = _f(1, "K: the reward's second term is the base model's value log-prob averaged "
                                     "over K counterfactual queries, drawn in the same batched passes (K blocks of "
                                     "base-model rows: about (1 + K) / 2 x the rollout's compute and KV cache); 1 is "
                                     "SPEC's single counterfactual")
    training_oracle: int = _f(0, "1: the rollout also scores every pair left at every step (the per-step oracle's "
                              "pass, on whenever choice_target_weight > 0), so the training batch's oracle_fraction "
                              "is logged: how much of the best pair's reward the choice gets; costs one scoring pass "
                              "of the pairs left per step")
    kl_reference: str = _f("previous", "KL penalty against: previous (SPEC's: the policy that rolled the batch out) | "
                           "base (the adapter-disabled base model, TRL's and verl's reference)")
    reward_baseline: str = _f("none", "subtracted from the reward in the loss: none (SPEC's) | running_mean (of the "
                              "rewards before the batch) | leave_one_out (mean of the article's other "
                              "trajectories_per_article - 1 trajectories, RLOO's); the filter always sees the raw reward")
    trajectories_per_article: int = _f(1, "trajectories of each article in a batch (same pool, own queries and "
                                       "choices); must divide generation_batch_size")
    num_episodes: int = _f(2000, "episodes (rollout batch + update phase); no early stopping")
    # --- run --------------------------------------------------------------------------------
    checkpoint_every: int = _f(100, "episodes between checkpoints (one is always written at the end)")
    eval_every: int = _f(0, "episodes between held-out evaluations logged as eval_* metrics (0: never)")
    eval_articles: int = _f(8, "held-out articles scored by --eval_every")
    keep_checkpoints: int = _f(0, "keep only the newest K checkpoints (0 keeps all)")
    max_nonfinite: int = _f(5, "stop after this many consecutive episodes with a non-finite reward, loss or gradient")
    log_every: int = _f(10, "episodes between console summaries")
    report_to: str = _f("none", "none, or a comma-separated list of tensorboard, trackio, wandb: each episode's "
                        "metrics and the config go there too (pip install -e '.[tracking]')")
    num_threads: int = _f(0, "CPU threads for torch (0: the cores this process may use, shared with the other "
                          "attnrl processes running now)")
    seed: int = _f(0, "seed of every random number generator")
    output_dir: str = _f("runs/default", "run directory (config, metrics, trajectories, checkpoints, figures)")

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")

        for f in fields(self):
            value = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "str": str}[f.type]
            if isinstance(value, bool) or not isinstance(value, want):
                raise ValueError(f"{f.name}={value!r} is invalid: must be of type {f.type}")
            if f.type == "float" and not math.isfinite(value):
                raise ValueError(f"{f.name}={value!r} is invalid: must be a finite number")
        for name in ("tokens_per_key", "tokens_per_value", "tokens_per_query", "generation_batch_size",
                     "training_batch_size", "gradient_accumulation_steps", "num_episodes", "checkpoint_every",
                     "log_every", "lora_r", "max_scan_articles", "trajectories_per_article", "choice_target_steps",
                     "hindsight_steps"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.num_kv_pairs >= 2, "num_kv_pairs", "an integer >= 2 (pair 0 is the in-context example)")
        need(0.0 < self.subset_fraction <= 1.0, "subset_fraction", "in (0, 1]")
        need(self.lora_alpha > 0, "lora_alpha", "> 0")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "in [0, 1)")
        need(bool(self.lora_target_modules.strip()), "lora_target_modules", "a non-empty comma-separated list")
        need(self.temperature > 0, "temperature", "> 0")
        need(self.query_temperature > 0, "query_temperature", "> 0")
        need(self.learning_rate > 0, "learning_rate", "> 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "> 0")
        need(self.kl_beta >= 0, "kl_beta", ">= 0")
        need(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "in [0, 1)")
        need(self.eval_every >= 0, "eval_every", "an integer >= 0 (0: never)")
        need(self.eval_articles >= 1, "eval_articles", "an integer >= 1")
        need(self.keep_checkpoints >= 0, "keep_checkpoints", "an integer >= 0 (0 keeps all)")
        need(self.max_nonfinite >= 1, "max_nonfinite", "an integer >= 1")
        need(self.warmup_trajectories >= 0, "warmup_trajectories", "an integer >= 0")
        need(self.filter_num_sd >= 0, "filter_num_sd", ">= 0")
        need(self.max_train_articles >= 0, "max_train_articles", "an integer >= 0 (0: all)")
        need(self.skip_train_articles >= 0, "skip_train_articles", "an integer >= 0")
        need(self.skip_train_articles == 0 or self.max_train_articles > 0, "skip_train_articles",
             "0 unless max_train_articles is set (it offsets the overfit check's N articles)")
        need(self.choice_in_loss in (0, 1), "choice_in_loss", "0 or 1")
        need(self.gradient_checkpointing in (0, 1), "gradient_checkpointing", "0 or 1")
        need(self.value_nll_weight >= 0, "value_nll_weight", ">= 0")
        need(self.choice_target_weight >= 0, "choice_target_weight", ">= 0")
        need(self.hindsight_weight >= 0, "hindsight_weight", ">= 0")
        need(self.choice_target_temperature > 0, "choice_target_temperature", "> 0")
        need(self.kl_reference in ("previous", "base"), "kl_reference", "previous or base")
        need(self.compile in (0, 1), "compile", "0 or 1")
        need(self.training_oracle in (0, 1), "training_oracle", "0 or 1")
        need(self.counterfactual_samples >= 1, "counterfactual_samples", "an integer >= 1 (1: SPEC's)")
        need(self.similarity_readout in ("mean", "last", "max"), "similarity_readout", "mean, last or max")
        need(self.choice_target_reach in ("q_proj", "below"), "choice_target_reach", "q_proj or below")
        need(self.choice_target_score in ("reward", "logprob"), "choice_target_score", "reward or logprob")
        need(self.reward_baseline in ("none", "running_mean", "leave_one_out"), "reward_baseline",
             "none, running_mean or leave_one_out")
        need(self.generation_batch_size % self.trajectories_per_article == 0, "trajectories_per_article",
             f"a divisor of generation_batch_size ({self.generation_batch_size})")
        need(self.reward_baseline != "leave_one_out" or self.trajectories_per_article >= 2, "trajectories_per_article",
             ">= 2 with reward_baseline leave_one_out (the baseline is the mean of the article's other trajectories)")
        need(self.training_batch_size <= self.generation_batch_size, "training_batch_size",
             f"<= generation_batch_size ({self.generation_batch_size}): at most that many trajectories are selected")
        need(self.preset in PRESETS, "preset", f"one of {sorted(PRESETS)}")
        need(self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda", "device",
             "auto, cpu, cuda or cuda:N")
        need(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "auto, float32, bfloat16 or float16")
        need(self.dataset_name == EMBEDDED_DATASET or "/" in self.dataset_name or self.dataset_name in HUB_DATASETS
             or Path(self.dataset_name).exists(), "dataset_name",
             f"a Hub dataset id such as 'wikimedia/wikipedia', 'wikipedia', {EMBEDDED_DATASET!r}, or a local file or folder")
        need(bool(self.output_dir), "output_dir", "a directory path")
        need(self.num_threads >= 0, "num_threads", "an integer >= 0 (0: automatic)")
        need(bool(self.text_column) and bool(self.id_column), "text_column", "a column name")
        parse_report_to(self.report_to)  # names a missing tracker package in one line

    # -- derived quantities ------------------------------------------------------------------------
    @property
    def tokens_per_kv_pair(self) -> int:
        return self.tokens_per_key + self.tokens_per_value

    @property
    def min_article_tokens(self) -> int:
        return self.tokens_per_kv_pair * self.num_kv_pairs

    @property
    def pool_size(self) -> int:
        """Pairs in a trajectory's pool (= its steps). Pair 0 is never in the pool, hence the cap."""
        return min(math.ceil(self.subset_fraction * self.num_kv_pairs), self.num_kv_pairs - 1)

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One field per line (`name  value`), fields that differ from the preset's defaults marked `*`: the
        config as a reader checks it, where the dataclass's repr is one long line."""
        base = PRESETS.get(self.preset, {})
        default = {f.name: base.get(f.name, f.default) for f in fields(self)}
        width = max(len(f.name) for f in fields(self))
        return "\n".join(f"{'*' if getattr(self, f.name) != default[f.name] and f.name != 'preset' else ' '} "
                         f"{f.name:{width}s}  {getattr(self, f.name)!r}" for f in fields(self))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, preset: str = "llama-3.2-3b", **overrides: Any) -> "TrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is unknown: must be one of {sorted(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}: see `python -m attnrl_core train --help`")
        return cls(**{**PRESETS[preset], "preset": preset, **overrides})

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a JSON or YAML file of field values (a run's `config.json` works as it is)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist: pass an existing JSON or YAML file")
        try:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is the same user mistake
            raise ValueError(f"config file {str(path)!r} is malformed ({type(e).__name__}: {e}): fix its syntax") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of field names to values")
        data = {**data, **overrides}
        return cls.from_preset(data.pop("preset", "llama-3.2-3b"), **data)


PRESETS: dict[str, dict[str, Any]] = {
    # SPEC.md's full run: Llama-3.2-3B in bf16 on a GPU, Hub Wikipedia streamed; gradient checkpointing on, the
    # memory plan's way to SPEC's micro-batch of 16 within 16 GB (`python -m attnrl_core memory`).
    "llama-3.2-3b": {},
    # Runs anywhere, offline, on two CPU cores: the packaged SmolLM2-135M and Wikipedia sample.
    # Sized so the README's main job takes a few minutes and the filter fires: two warm-up batches,
    # then about one trajectory in six clears mean + 1 SD.
    "embedded": {
        "model_name": EMBEDDED_MODEL,
        "dataset_name": EMBEDDED_DATASET,
        "dataset_config": "",
        "num_kv_pairs": 8,
        "gradient_checkpointing": 0,  # a CPU's memory holds the small model's activations: no recomputation
        "generation_batch_size": 8,
        "training_batch_size": 4,
        "num_episodes": 20,
        "checkpoint_every": 10,
        "log_every": 5,
        "device": "cpu",
        "output_dir": "runs/embedded",
    },
}


def project_path(*parts: str | Path) -> Path:
    """A path a reader types, resolved from the repository root whatever the working directory: a notebook's
    kernel runs in notebooks/ (JupyterLab, nbmake) or wherever papermill was started, and `runs/NAME` must
    mean the same run in all of them. An absolute path (or `~/...`) stays as it is. Outside a checkout (an
    installed package) relative paths fall back to the working directory."""
    root = Path(__file__).resolve().parents[1]
    base = root if (root / "pyproject.toml").is_file() else Path.cwd()
    return base.joinpath(*(Path(p).expanduser() for p in parts))  # joinpath keeps an absolute part as it is


def default_run_dir(preset: str) -> Path:
    return project_path("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
