#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what `benchmarks/gpu_proof.sh` needs on a bare GPU machine without internet
# (docs/gpu.md), within the device's 64 MiB a call (working tree included):
#   .whl/        the wheels the lent H200s lack or hold too old (their image: torch 2.11, transformers 5.17,
#                huggingface_hub 1.33, no bitsandbytes, datasets or kernels), at the versions of this .venv; the
#                bitsandbytes wheel cut to its CPU and CUDA 13.0 libraries (43 MB -> about 4 MB; the H200s run
#                CUDA 13.0), its RECORD rewritten to match;
#   .gpu_cache/  ATTNRL_CACHE for the proof: the embedded tokenizer (no weights: the proof's model is random) and
#                the Wikipedia sample, so nothing is rebuilt there from packages it does not have.
# Both are git-ignored. Then, on the GPU machine (one call; `carry` .whl and .gpu_cache):
#   ATTNRL_CACHE=$PWD/.gpu_cache WHEELS=.whl bash benchmarks/gpu_proof.sh "$OUT/proof"
# The same on the CPU, as CI's dry run does without the wheels:
#   ATTNRL_CACHE=$PWD/.gpu_cache WHEELS=.whl PY=.venv/bin/python bash benchmarks/gpu_proof.sh --dry_run /tmp/proof
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PACKAGES=(transformers peft bitsandbytes datasets dill multiprocess huggingface_hub httpx2 kernels tomlkit regex
          hf-xet)
rm -rf .whl .gpu_cache
mkdir -p .whl
pins=()
for name in "${PACKAGES[@]}"; do pins+=("$name==$("$PY" -c "from importlib.metadata import version; print(version('$name'))")"); done
echo "wheels: ${pins[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}" 2>&1 | grep -v '^WARNING' || true
"$PY" - .whl <<'EOF'
"""Cut the bitsandbytes wheel to the libraries the CPU and a CUDA 13.0 GPU load; RECORD lists what is left."""
import sys
import zipfile
from pathlib import Path

(wheel,) = Path(sys.argv[1]).glob("bitsandbytes-*.whl")
keep = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so")


def dropped(name: str) -> bool:
    return name.endswith(".so") and not name.endswith(keep)


slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if dropped(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):  # one line per file: "path,hash,size"
            data = "".join(line for line in data.decode().splitlines(keepends=True)
                           if not dropped(line.split(",")[0])).encode()
        dst.writestr(item, data)
slim.replace(wheel)
EOF
CACHE=${ATTNRL_CACHE:-$HOME/.cache/attnrl}
"$PY" -c "from attnrl_core.assets import embedded_model_dir, embedded_dataset_file; embedded_model_dir(); embedded_dataset_file()"
mkdir -p .gpu_cache/smollm2-135m-v1
cp "$CACHE"/smollm2-135m-v1/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} \
  .gpu_cache/smollm2-135m-v1/
cp "$CACHE"/smollm2-135m-v1/chat_template.jinja .gpu_cache/smollm2-135m-v1/ 2>/dev/null || true
cp -r "$CACHE"/enwiki-sample-v1 .gpu_cache/
[[ -f "$CACHE/article-lengths.json" ]] && cp "$CACHE/article-lengths.json" .gpu_cache/
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carry=$(du -cb .whl .gpu_cache | tail -1 | cut -f1)
echo "working tree $((tree / 2**20)) MiB + .whl and .gpu_cache $((carry / 2**20)) MiB = $(((tree + carry) / 2**20)) MiB of 64"
(( tree + carry < 64 * 2**20 )) || { echo "gpu_carry: over the device's 64 MiB a call: leave something out (the
largest tracked files: experiments/kept/*/ checkpoints and trajectories, 4.6 MB a run, which a finished experiment no
longer needs; its summary, metrics and evaluations are small)"; exit 1; }
