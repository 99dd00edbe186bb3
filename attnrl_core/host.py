"""The machine a run is on: seeding, the CPU allocator, peak memory, freeing memory, a hardware summary.

Host utilities that the loop, the evaluation and the benchmark share, so none of them imports another
for them. Imports nothing from attnrl_core.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import random
import resource
import tempfile
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def keep_freed_memory(device: torch.device) -> bool:
    """On a CPU under glibc, have malloc keep the memory it frees for reuse instead of returning it to the
    system; returns whether it did (a process-wide setting, idempotent).

    glibc serves every block above 32 MB with a fresh `mmap` and unmaps it when freed, so each large
    tensor, a [rows, vocabulary] logits tensor or an activation of the update, page-faults all of its
    pages in again every time (the cost is measured in BENCHMARKS.md). Served from the heap and not
    trimmed, freed blocks are reused. The price is that the process keeps up to its peak resident size,
    which it reaches again every episode anyway.
    """
    if device.type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated (GPU) or peak resident set size of this process (CPU), since the last
    `reset_peak_memory`."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:  # VmHWM follows a clear_refs reset; ru_maxrss (the fallback off Linux) does not
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def phase_memory(device: torch.device, phase: str) -> dict[str, int]:
    """On CUDA, a phase's peaks since the last reset, then reset: `{phase}_peak_allocated_bytes` (the tensors'),
    `{phase}_peak_reserved_bytes` (what the caching allocator held: the card's own figure, the plan's with the
    allocator's blocks) and `outside_allocator_bytes` (the card's used memory beyond what the allocator holds: the
    CUDA context and libraries' own, plus any other process's). On the CPU nothing (VmHWM has one peak)."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    out = {f"{phase}_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
           f"{phase}_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
           "outside_allocator_bytes": int(total - free - torch.cuda.memory_reserved(device))}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU), so a timer measures the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware_state(device: torch.device) -> str:
    """One line for error logs: device, memory in use and at peak, threads."""
    if device.type == "cuda":
        gib = 1024**3
        return (f"CUDA {torch.cuda.get_device_name(device)}: allocated {torch.cuda.memory_allocated(device) / gib:.2f} GiB, "
                f"reserved {torch.cuda.memory_reserved(device) / gib:.2f} GiB, "
                f"peak {peak_memory_bytes(device) / gib:.2f} GiB")
    return f"CPU: peak RSS {peak_memory_bytes(device) / 1024**3:.2f} GiB, {torch.get_num_threads()} threads"


# -- sharing the CPU with the other attnrl processes ----------------------------------------------------
def _registry() -> Path:
    path = Path(tempfile.gettempdir()) / f"attnrl-processes-{os.getuid()}"
    path.mkdir(exist_ok=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def sharing_cpu(device: torch.device):
    """While inside, this process counts as an attnrl process computing on the CPU (`share_cpu` divides the
    cores among those); a mark left by a killed process is dropped when its PID is found dead."""
    mark = _registry() / str(os.getpid())
    if device.type == "cpu":
        mark.touch()
    try:
        yield
    finally:
        mark.unlink(missing_ok=True)


def running_processes() -> int:
    """attnrl processes computing on the CPU now (this one included if registered); stale marks removed."""
    count = 0
    for mark in _registry().iterdir():
        if mark.name.isdigit() and _alive(int(mark.name)):
            count += 1
        else:
            mark.unlink(missing_ok=True)
    return max(count, 1)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cpu(requested: int = 0) -> int:
    """Set torch's intra-op threads: `requested` when > 0, else this process's share of the cores it may
    use among the attnrl processes running now; returns the count. Called again (each episode), it follows
    processes that start or stop. Two processes with every core each make their threads fight (spinning
    OpenMP workers, each waiting on the other's): 5-20x slower than sharing (BENCHMARKS.md)."""
    threads = requested if requested > 0 else max(1, usable_cores() // running_processes())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
