"""The set-up promises of the README: one dependency list, .venv ignored, CI runs the test command."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements):
    return {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in requirements}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _names(project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # the same names; the versions are requirements.lock's exact ones (tests/test_setup.py), and `-c` the lock
    assert set(_names(r for r in pip if not r.startswith("-"))) == set(wanted)
    assert "-c requirements.lock" in pip
    assert any(str(d).startswith("python") for d in env["dependencies"]) and "pip" in env["dependencies"]


def test_required_dependencies_present():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set(_names(project["dependencies"] + project["optional-dependencies"]["test"]))
    for dep in ("torch", "transformers", "peft", "bitsandbytes", "datasets", "gguf", "safetensors", "jupyterlab",
                "ipywidgets", "matplotlib", "papermill", "nbmake", "pytest", "tqdm"):
        assert dep in names
    assert "torch>=2.13.0" in project["dependencies"]  # a lower bound, never a CUDA build


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make train" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
