"""The machine a run is on: seeding, the CPU allocator, peak memory, freeing memory, a hardware summary.

Host utilities that the loop, the evaluation and the benchmark share, so none of them imports another
for them. Imports nothing from attnrl_core.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import random
import resource
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
