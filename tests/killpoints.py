"""Kill a training run at a chosen point, or at random moments, and check that `--resume` recovers.

In a child process (`run_child`, or `python tests/killpoints.py POINT COUNT -- ARGS`) it runs the CLI's
`python -m attnrl_core ARGS` and SIGKILLs that process at the COUNT-th occurrence of POINT (no cleanup, no
flush: as a crash or an out-of-memory killer would):

  load            the model is being loaded (`from_pretrained`)
  rollout         a rollout is choosing a pair (`rollout.choose_pairs`)
  update          an update has just computed a gradient (`Tensor.backward`)
  write:NAME      a file whose name contains NAME is being written: half of the first write reaches
                  the file, then the process dies (a torn log line, a half-written config or checkpoint)

As a script: `python tests/killpoints.py --trials 20` kills a short run at 20 random moments, resumes
each until it finishes, and compares every final adapter with an uninterrupted run's (to 1e-6). A
moment is drawn uniformly over the rest of the run once its first checkpoint exists (before that there
is nothing to resume; the kill-point test covers model loading and config writing), and every other
resume is itself killed at a random moment, which lands in its model load or later.
"""

from __future__ import annotations

import argparse
import builtins
import io
import multiprocessing
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attnrl_core.__main__ import main as cli_main

RUN = ["--preset", "embedded", "--generation_batch_size", "2", "--training_batch_size", "1", "--num_kv_pairs", "3",
       "--tokens_per_key", "8", "--tokens_per_value", "8", "--tokens_per_query", "6", "--warmup_trajectories", "2",
       "--filter_num_sd", "0", "--learning_rate", "1e-3", "--checkpoint_every", "1", "--no_progress",
       "--num_episodes", "4", "--num_threads", "1"]
# One thread, fixed: with the automatic count a run shares the cores with whatever attnrl processes run beside it,
# and a resumed run that got a different thread count sums in a different order (Adam turns that 1e-7 into 1e-3).


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _nth(count: int):
    """A callable that returns True on its `count`-th call."""
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == count

    return hit


class _TornWriter:
    """A file object whose first write stops halfway, then kills the process."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        self._fh.write(data[: max(1, len(data) // 2)])
        self._fh.flush()
        os.fsync(self._fh.fileno())
        _die()

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)


def arm(point: str, count: int) -> None:
    """Install the kill at the `count`-th `point` in this process."""
    hit = _nth(count)
    if point == "load":
        import transformers

        real = transformers.AutoModelForCausalLM.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            if hit():
                _die()
            return real(cls, *args, **kwargs)

        transformers.AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)
    elif point == "rollout":
        from attnrl_core import rollout

        real_choose = rollout.choose_pairs

        def choose_pairs(*args, **kwargs):
            if hit():
                _die()
            return real_choose(*args, **kwargs)

        rollout.choose_pairs = choose_pairs
    elif point == "update":
        import torch

        real_backward = torch.Tensor.backward

        def backward(self, *args, **kwargs):
            real_backward(self, *args, **kwargs)
            if hit():
                _die()

        torch.Tensor.backward = backward
    elif point.startswith("write:"):
        name, real_open = point.split(":", 1)[1], builtins.open

        def open_(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            if any(m in mode for m in "wa") and name in os.fspath(file) and hit():
                return _TornWriter(fh)
            return fh

        builtins.open = io.open = open_
    else:
        raise ValueError(f"unknown kill point {point!r}")


# Children are forked from one server process that has imported the CLI once, so a launch does not pay the
# ~10 CPU-seconds of importing torch, transformers and peft again; each is still a process of its own,
# killed with SIGKILL as a crash would be.
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["attnrl_core.__main__", "attnrl_core.run", "attnrl_core.evaluate"])


def _child(point: str | None, count: int, args: list[str], log: str) -> None:
    """The body of `run_child`'s process: output to `log`, the kill armed, then the CLI."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if point:
        arm(point, count)
    sys.exit(cli_main(args))


def run_child(point: str | None, count: int, args: list[str], timeout: float = 1800, log: Path | None = None) -> int:
    """Run the CLI in a child (killed at `point` if given); its exit code (-9 when killed). Its output goes
    to `log` when given (to say why a resume failed), else nowhere."""
    proc = _FORKS.Process(target=_child, args=(point, count, args, str(log) if log else os.devnull))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise subprocess.TimeoutExpired(args, timeout)
    return proc.exitcode


def final_adapter(run_dir: Path, episode: int):
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "checkpoints" / f"episode-{episode}" / "adapter_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float = 1800) -> str:
    """Block until the child writes a stderr line containing `text` (it logs each checkpoint and, with
    --log_every 1, each episode); fail if it exits first or `timeout` passes (a guard against a hang, far past
    a loaded machine's time, not a time limit). Reads the raw pipe, so no
    line waits in a Python buffer while `select` sees nothing new."""
    deadline, pending = time.monotonic() + timeout, b""
    fd = proc.stderr.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=deadline - time.monotonic()):
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"the run exited (code {proc.wait()}) before logging {text!r}")
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if text.encode() in line:
                    return line.decode()
    proc.kill()
    raise AssertionError(f"no {text!r} within {timeout}s")


def _kill_after(args: list[str], delay: float, wait_for: str | None = None) -> str:
    """Start the CLI, wait for the `wait_for` log line if given, then SIGKILL it `delay` seconds later
    (unless it finished first); what happened, in words."""
    proc = subprocess.Popen([sys.executable, "-m", "attnrl_core", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if wait_for:
        wait_for_line(proc, wait_for)
    try:
        proc.wait(timeout=delay)
        return f"finished before {delay:.1f}s"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return f"killed {delay:.1f}s" + (" after its first checkpoint" if wait_for else " after its start")


def _trials(n: int, seed: int) -> int:
    """Kill the RUN at `n` random moments, resume until done, compare with an uninterrupted run."""
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="kill-trials-"))
    ref = work / "ref"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "attnrl_core", "train", *RUN, "--output_dir", str(ref)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_line(proc, "checkpoint episode-1 written")
    t1 = time.perf_counter()
    assert proc.wait() == 0
    start, rest = t1 - t0, time.perf_counter() - t1
    reference = final_adapter(ref, 4)
    print(f"uninterrupted run: first checkpoint after {start:.1f}s, then {rest:.1f}s to the end")
    failures = 0
    for i in range(n):
        out = work / f"trial-{i}"
        resume = ["train", "--resume", "--output_dir", str(out), "--no_progress"]
        events = [_kill_after(["train", *RUN, "--output_dir", str(out)], rng.uniform(0, rest),
                              "checkpoint episode-1 written")]
        if i % 2:
            events.append("resume " + _kill_after(resume, rng.uniform(0, start + rest)))
        log = work / f"trial-{i}-resume.log"
        code = run_child(None, 0, resume, log=log)
        diff = max_difference(reference, final_adapter(out, 4)) if code == 0 else float("nan")
        ok = code == 0 and diff <= 1e-6
        failures += not ok
        why = "" if code == 0 else f" ({(log.read_text().strip().splitlines() or ['no output'])[-1][:200]})"
        print(f"trial {i + 1:2d}: {'; '.join(events)}; final resume exit {code}{why}, max adapter difference "
              f"{diff:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    if failures:
        print(f"the failed trials' run directories and resume logs are kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{n - failures} of {n} trials ended with the uninterrupted run's adapter")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trials"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("--trials", type=int, required=True)
        parser.add_argument("--seed", type=int, default=0)
        opts = parser.parse_args()
        sys.exit(_trials(opts.trials, opts.seed))
    point, count, sep, *cli = sys.argv[1:]
    assert sep == "--", sys.argv
    if point != "none":
        arm(point, int(count))
    sys.exit(cli_main(cli))
