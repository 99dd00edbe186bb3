"""What a card spends on SPEC's run, episode by episode, without a card (issue 38; BENCHMARKS.md "Memory").

  python benchmarks/memory_model.py [--layers 28] [--episodes 2] [--json]

Traces two episodes (rollout of 64 rows, then an update micro-batch of 16) of the Llama-3.2-3B preset on `meta`
(`memtrace.trace_episodes`, CUDA's fused attention kernels substituted), records every accelerator allocation and
free in order, and replays them through the caching allocator's model (`memtrace.Allocator`) with the default
allocator and with expandable segments: per phase of each episode, the allocated peak, the plan's figure with its
overheads (`memory.card_spend`, no CUDA context) and the smallest card the allocator's model runs the episodes on
so far (`memtrace.card_needed`: allocated peak plus the blocks it cannot hand back). No GPU needed; minutes on one
CPU core at 28 layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from attnrl_core.config import TrainConfig
from attnrl_core.memory import GB, PRESET_SHAPES, SequenceShape, card_spend, plan
from attnrl_core.memtrace import card_needed, trace_episodes


def measure(layers: int, episodes: int) -> dict:
    cfg = TrainConfig.from_preset("llama-3.2-3b")
    shape = dataclasses.replace(PRESET_SHAPES["llama-3.2-3b"], layers=layers)
    traced = trace_episodes(cfg, shape, SequenceShape.of(cfg), layers, 64, 16, episodes, record=True)
    planned = plan(cfg, shape)
    rows = []
    for index, (phase, first, end) in enumerate(traced.phases):
        episode = index // 2 + 1
        peak = traced.episodes[episode - 1]
        allocated = traced.static_bytes + (peak.rollout_bytes if phase == "rollout" else peak.update_bytes)
        spend = {e: card_spend(planned, expandable=e, context=0)[phase]["total"] for e in (False, True)}
        # the card the allocator needs for everything up to this phase's end: the model's reserved peak
        needed = {e: card_needed(traced.weights, traced.events[:end], e) for e in (False, True)}
        rows.append({"episode": episode, "phase": phase, "allocated": allocated,
                     "planned_allocated": planned.static + (planned.rollout if phase == "rollout" else planned.update),
                     "planned_default": spend[False], "planned_expandable": spend[True],
                     "allocator_default": needed[False], "allocator_expandable": needed[True]})
    return {"layers": layers, "episodes": episodes, "rows": rows}


def table(result: dict) -> str:
    lines = ["| episode | phase | allocated (traced) | planned allocated | planned + allocator, default | "
             "allocator model, default | planned + allocator, expandable | allocator model, expandable |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['episode']} | {r['phase']} | " + " | ".join(
            f"{r[k] / GB:.2f}" for k in ("allocated", "planned_allocated", "planned_default", "allocator_default",
                                          "planned_expandable", "allocator_expandable")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.layers, args.episodes)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
