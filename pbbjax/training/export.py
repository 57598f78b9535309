"""A run's Orbax checkpoint -> a Hugging Face model directory, on CPU, for any model size (the library of
``python -m pbbjax.export``).

This module owns finding the checkpoint to export in a run (``<workdir>/checkpoints/<step>/``, and the
ends of branched stages in ``<workdir>/stage_ends/<stage>/``), streaming its parameters out of Orbax's
array store into safetensors shards, and ``write_source_model``: checkpoints hold arrays only, so the
runner writes the run's HF config, generation config and tokenizer to ``<workdir>/source_model/`` once at
start (``--model`` names them where that directory is missing).

Streaming: each parameter is read straight from the checkpoint's TensorStore arrays with Orbax's own read
spec (the optimizer state is never touched), one stored chunk at a time (Orbax stores a chunk per device
shard, spanning all layers); a parameter stacked over layers is read in blocks of as many layers as fit in
the size of the largest HF tensor, so its chunks are decoded once per block (1-5 times for the paper's
models). Each layer's tensor is converted with ``hf_weights``' table and appended to its shard as soon as
it is read (``save_tensors_streaming``): host memory holds one block and one converted tensor, about
twice the largest HF tensor, plus one decoded chunk. Every parameter is checked against the checksums the
Checkpointer recorded when it saved it.

A LoRA run's checkpoint (its fingerprint names the adapters' rank, alpha and targets) exports merged, each
adapted projection's base tensor plus ``(alpha / rank) B A``; with ``--adapter``, the adapters alone in
peft's format (``models/lora_io.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from pbbjax.core.storage import is_remote, orbax_path
from pbbjax.models.architecture import LoRAConfig, ModelConfig, resolve_dtype
from pbbjax.models.decoder import Transformer
from pbbjax.models.hf_io import TOKENIZER_FILES as _TOKENIZER_CORE
from pbbjax.models.hf_io import _replace_dir, hf_config_dict
from pbbjax.models.hf_weights import hf_shape, param_table, save_tensors_streaming, to_hf
from pbbjax.models.lora import adapter_names, hf_delta
from pbbjax.models.lora_io import peft_tensors, write_adapter

log = logging.getLogger(__name__)

SOURCE_MODEL = "source_model"
# What tokenizer.save_pretrained writes (the core files are the ones hf_io looks for).
TOKENIZER_FILES = (
    *_TOKENIZER_CORE,
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_CHECKSUM_PIECE = 1 << 20  # elements hashed at once: bounds the hash's temporaries


class ExportError(RuntimeError):
    """The checkpoint or source model asked for is missing, ambiguous or unreadable."""


@contextlib.contextmanager
def _new_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to fill, which then replaces ``out`` whole (and is removed on error)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_source_model(workdir: str | Path, cfg: ModelConfig, tokenizer) -> Path:
    """``<workdir>/source_model/``: the run's config.json (every source field), generation config and
    tokenizer, which export needs and checkpoints lack. Written by process 0, replacing an older copy."""
    out = Path(workdir) / SOURCE_MODEL
    if jax.process_index() != 0:
        return out
    with _new_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.hf_config, indent=2, sort_keys=True))
        if cfg.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(cfg.generation_config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


# -- which checkpoint ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path  # the step directory
    stage: str | None  # None when its meta cannot be read
    step: int | None  # the global step; None for a stage end
    stage_step: int | None = None

    def __str__(self) -> str:
        if self.step is None:
            return f"the end of stage {self.stage!r} ({self.path})"
        return f"step {self.step} (stage {self.stage!r}, step {self.stage_step} of it) ({self.path})"


def _read_json_item(step_dir: Path, item: str) -> dict | None:
    """The JSON item ``meta`` or ``info`` of a checkpoint; None when it cannot be read."""
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(orbax_path(step_dir / item))
    except Exception as e:  # reported by the caller where it matters
        log.debug("cannot read %s of %s: %s", item, step_dir, e)
        return None


def checkpoint_lora(info: dict) -> LoRAConfig | None:
    """The LoRA adapters a checkpoint holds, from the fingerprint in its ``info`` item (None: no LoRA)."""
    lora = info.get("fingerprint", {}).get("lora")
    return LoRAConfig(lora["rank"], lora["alpha"], tuple(lora["targets"])) if lora else None


def read_info(step_dir: Path) -> dict:
    """A checkpoint's ``info`` item (fingerprint, checksums); {} when it cannot be read."""
    return _read_json_item(step_dir, "info") or {}


def _list(root: Path) -> list[Checkpoint]:
    """The committed checkpoints in ``root`` (Orbax lists no half-written step)."""
    stage_end = root.parent.name == "stage_ends"
    out = []
    for step in sorted(ocp.utils.checkpoint_steps(orbax_path(root))):
        meta = _read_json_item(root / str(step), "meta") or {}
        stage = meta.get("stage", root.name if stage_end else None)
        out.append(Checkpoint(root / str(step), stage, None if stage_end else step, meta.get("stage_step")))
    return out


def _workdir_of(root: Path) -> Path:
    return root.parent.parent if root.parent.name == "stage_ends" else root.parent


def as_path(path: str | Path) -> Path:
    """A local path, or for a URL (``gs://``) an ``epath.Path``, which reads it through fsspec."""
    return epath.Path(path) if is_remote(path) else Path(path)


def find_checkpoints(path: str | Path) -> tuple[list[Checkpoint], Path]:
    """Every checkpoint under ``path`` (a run's workdir, its ``checkpoints/`` or a ``stage_ends/<stage>/``
    directory, or one step directory, local or ``gs://``), and the run's workdir."""
    path = as_path(path)
    if not path.is_dir():
        raise ExportError(f"--checkpoint {path} is not a directory")
    if (path / "checkpoints").is_dir() or (path / "stage_ends").is_dir():
        roots = [path / "checkpoints", *sorted((path / "stage_ends").glob("*"))]
        return [c for root in roots if root.is_dir() for c in _list(root)], path
    if path.name.isdigit() and (path / "state").is_dir():
        return [c for c in _list(path.parent) if c.path == path], _workdir_of(path.parent)
    return _list(path), _workdir_of(path)


def select_checkpoint(
    found: list[Checkpoint], where: Path, stage: str | None = None, step: int | None = None
) -> Checkpoint:
    """The checkpoint of global ``step``, else the newest of ``stage`` (its stage end if only that is
    left), else the newest."""
    if not found:
        raise ExportError(
            f"no checkpoints in {where}: expected a run's workdir (with checkpoints/<step>/ or "
            f"stage_ends/<stage>/), a checkpoints directory, or one <step>/ directory"
        )
    steps = sorted(c.step for c in found if c.step is not None)
    stages = sorted({c.stage for c in found if c.stage is not None})
    if step is not None:
        found = [c for c in found if c.step == step]
        if not found:
            raise ExportError(f"step {step} is not among the checkpoints in {where}; steps present: {steps}")
    if stage is not None:
        matching = [c for c in found if c.stage == stage]
        if not matching and step is not None:
            raise ExportError(f"step {step} in {where} belongs to stage {found[0].stage!r}, not {stage!r}")
        if not matching:
            raise ExportError(f"no checkpoint of stage {stage!r} in {where}; stages present: {stages}")
        found = matching
    if all(c.step is None for c in found) and len(found) > 1:
        raise ExportError(f"{where} holds only stage ends; pick one with --stage (stages present: {stages})")
    return max(found, key=lambda c: -1 if c.step is None else c.step)


def _source_dir(model: str | Path | None, workdir: Path, scratch: Path) -> Path:
    """The run's HF config and tokenizer as a local directory (a ``gs://`` run's copied to ``scratch``)."""
    if model is not None:
        if not (Path(model) / "config.json").is_file():
            raise ExportError(f"--model {model} is not a local Hugging Face directory: no config.json")
        return Path(model)
    source = workdir / SOURCE_MODEL
    if not (source / "config.json").is_file():
        raise ExportError(
            f"{source}/config.json is missing: the run's HF config and tokenizer are not in its workdir "
            f"(runs older than pbbjax writing {SOURCE_MODEL}/); pass --model with the HF directory the run "
            f"started from (for the tiny preset: {workdir / 'tiny_model'})"
        )
    if isinstance(source, Path):
        return source
    for file in source.iterdir():  # a few small files: the config, generation config and tokenizer
        if file.is_file():
            (scratch / file.name).write_bytes(file.read_bytes())
    return scratch


# -- reading the checkpoint ---------------------------------------------------------------------------
def _first_line(e: Exception) -> str:
    return str(e).split(" [tensorstore_spec=")[0].splitlines()[0][:300] if str(e) else type(e).__name__


class CheckpointArrays:
    """The arrays of a checkpoint's ``state`` item, opened with Orbax's TensorStore read spec and read
    a block of rows at a time, one stored chunk at a time (with one I/O and one decoding thread)."""

    def __init__(self, step_dir: Path):
        self.step_dir = step_dir
        metadata = step_dir / "state" / "_METADATA"
        try:
            layout = json.loads(metadata.read_text())
        except (OSError, ValueError) as e:
            raise ExportError(f"checkpoint {step_dir} is corrupted: cannot read {metadata} ({e})") from e
        self._ocdbt, self._zarr3 = layout.get("use_ocdbt", True), layout.get("use_zarr3", False)
        self._context = ocp.type_handlers.get_ts_context(
            use_ocdbt=self._ocdbt, file_io_concurrency_limit=1, data_copy_concurrency_limit=1
        )
        self._stores: dict[str, ts.TensorStore] = {}

    def open(self, name: str) -> ts.TensorStore:
        if name not in self._stores:
            info = ocp.type_handlers.ParamInfo(
                name=name,
                parent_dir=orbax_path(self.step_dir / "state"),
                use_zarr3=self._zarr3,
                ts_context=self._context,
            )
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            try:
                self._stores[name] = ts.open(spec, context=self._context, open=True, read=True).result()
            except Exception as e:
                raise ExportError(
                    f"checkpoint {self.step_dir} is corrupted or holds no model parameters: cannot open "
                    f"the array {name!r} ({_first_line(e)})"
                ) from e
        return self._stores[name]

    def read(self, name: str, rows: slice) -> np.ndarray:
        """Rows ``rows`` of the leading axis, gathered one stored chunk at a time: TensorStore holds every
        chunk a read touches at once, and a parameter's chunks (one per device shard) span all layers."""
        store = self.open(name)
        start, stop = (rows.start, *[0] * (store.ndim - 1)), (rows.stop, *store.shape[1:])
        out = np.empty([b - a for a, b in zip(start, stop, strict=True)], store.dtype.numpy_dtype)
        for box in _chunk_boxes(start, stop, store.chunk_layout.read_chunk.shape):
            try:
                piece = store[box].read().result()
            except Exception as e:
                raise ExportError(
                    f"checkpoint {self.step_dir} is corrupted: reading {name!r} failed ({_first_line(e)})"
                ) from e
            out[(slice(box[0].start - rows.start, box[0].stop - rows.start), *box[1:])] = piece
        return out


def _chunk_boxes(start, stop, chunk) -> Iterator[tuple[slice, ...]]:
    """The pieces of the box [start, stop) that each lie in one chunk of a grid of ``chunk``-sized chunks."""
    grid = [range(a - a % c, b, c) for a, b, c in zip(start, stop, chunk, strict=True)]
    for corner in itertools.product(*grid):
        yield tuple(
            slice(max(x, a), min(x + c, b)) for x, a, b, c in zip(corner, start, stop, chunk, strict=True)
        )


def checksum_part(x: np.ndarray, offset: int) -> int:
    """``training.checkpoint._checksum``'s sum over the elements of ``x``, which sit at flat indices
    ``offset``... of the whole array; the parts of an array add up (mod 2**32) to its checksum."""
    words = np.ascontiguousarray(x).reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.itemsize])
    total = 0
    for i in range(0, words.size, _CHECKSUM_PIECE):
        w = words[i : i + _CHECKSUM_PIECE].astype(np.uint32)
        index = (np.arange(offset + i, offset + i + w.size, dtype=np.uint64) % 2**32).astype(np.uint32)
        h = (w ^ (index * np.uint32(0x9E3779B9))) * np.uint32(0x85EBCA6B)
        total += int(np.sum(h ^ (h >> np.uint32(13)), dtype=np.uint32))
    return total % 2**32


def _abstract_model(cfg: ModelConfig) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _param_leaves(cfg: ModelConfig) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """{table path: (Orbax array name, checksum key, shape)} of the parameters in a saved train state."""
    tree = {"params": nnx.state(_abstract_model(cfg), nnx.Param)}
    names = jax.tree.leaves(ocp.tree.get_param_names(tree))
    out = {}
    for (keypath, leaf), name in zip(jax.tree_util.tree_flatten_with_path(tree)[0], names, strict=True):
        path = ".".join(k.key for k in keypath[1:] if isinstance(k, jax.tree_util.DictKey))
        out[path] = (name, jax.tree_util.keystr(keypath), tuple(leaf.shape))
    return out


def _stacked(path: str) -> bool:
    return path.startswith("layers.")


def _read_whole(arrays, leaves, path: str, checksums: dict) -> np.ndarray:
    """A small parameter (a LoRA adapter) read whole and checked against its recorded checksum."""
    name, key, shape = leaves[path]
    x = arrays.read(name, slice(0, shape[0]))
    saved = checksums.get(key)
    if saved and saved[0] == x.dtype.name and saved[1] != checksum_part(x, 0):
        raise ExportError(f"checkpoint {arrays.step_dir} is corrupted: checksum mismatch for {key}")
    return x


def _hf_tensors(arrays, leaves, cfg, out_dtype, block_bytes: int, checksums: dict):
    """(HF name, tensor) in ``param_table`` order, reading each stacked parameter ``block_bytes`` of
    layers at a time, and checking each parameter's checksum once it is read whole; LoRA adapters are
    merged into their base tensor."""
    for path, hf_name, kind in param_table(cfg):
        name, key, shape = leaves[path]
        a_path, b_path = adapter_names(path)
        lora = [_read_whole(arrays, leaves, p, checksums) for p in (a_path, b_path) if p in leaves]
        stacked, row = _stacked(path), math.prod(shape[1:])
        dtype = arrays.open(name).dtype.numpy_dtype
        per = max(1, block_bytes // (row * dtype.itemsize)) if stacked else 1
        total = 0
        n = shape[0] if stacked else 1
        for start in range(0, n, per):
            block = arrays.read(name, slice(start, min(start + per, n)) if stacked else slice(0, shape[0]))
            total += checksum_part(block, start * row)
            for i, x in enumerate(block if stacked else [block], start):
                x = to_hf(kind, x)
                if lora:
                    x = x.astype(np.float32) + hf_delta(lora[0][i], lora[1][i], cfg.lora.scale)
                yield hf_name.format(i=i), np.ascontiguousarray(x, dtype=out_dtype)
            del block, x  # freed before the next block is read
        saved = checksums.get(key)
        if saved is None and checksums:
            log.warning("checkpoint %s records no checksum for %s: not verified", arrays.step_dir, key)
        if saved and saved[0] == dtype.name and saved[1] != total % 2**32:
            raise ExportError(f"checkpoint {arrays.step_dir} is corrupted: checksum mismatch for {key}")


def _specs(
    cfg: ModelConfig, leaves: dict, out_dtype: np.dtype
) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(HF name, shape, dtype) of every tensor, in the order ``_hf_tensors`` yields them."""
    specs = []
    for path, hf_name, kind in param_table(cfg):
        shape = leaves[path][2]
        for i in range(shape[0]) if _stacked(path) else [0]:
            specs.append(
                (hf_name.format(i=i), hf_shape(kind, shape[1:] if _stacked(path) else shape), out_dtype)
            )
    return specs


# -- the export ---------------------------------------------------------------------------------------
def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    stage: str | None = None,
    step: int | None = None,
    model: str | Path | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    block_bytes: int | None = None,
    adapter: bool = False,
) -> Path:
    """Write the chosen checkpoint of a run as an HF directory ``out`` (replaced whole, atomically); a LoRA
    run's merged, or with ``adapter`` its adapters alone as a peft adapter directory.

    ``block_bytes``: how much of a parameter stacked over layers is read at once (whole layers, at least
    one); by default the size of the largest tensor.
    """
    with tempfile.TemporaryDirectory(prefix="pbbjax-source-") as scratch:
        args = (stage, step, model, dtype, max_shard_bytes, block_bytes, adapter)
        return _export(checkpoint, out, *args, Path(scratch))


def _export(checkpoint, out, stage, step, model, dtype, max_shard_bytes, block_bytes, adapter, scratch):
    found, workdir = find_checkpoints(checkpoint)
    picked = select_checkpoint(found, as_path(checkpoint), stage, step)
    source = _source_dir(model, workdir, scratch)
    print(f"exporting {picked} with the config and tokenizer of {source}")
    generation = source / "generation_config.json"
    generation = json.loads(generation.read_text()) if generation.is_file() else {}
    info = read_info(picked.path)
    cfg = ModelConfig.from_dir(source, generation_config=generation, lora=checkpoint_lora(info))
    leaves = _param_leaves(cfg)
    arrays = CheckpointArrays(picked.path)
    for name, _, want in leaves.values():
        if (got := tuple(arrays.open(name).shape)) != want:
            raise ExportError(
                f"checkpoint {picked.path} holds {name} of shape {got}, the model of "
                f"{source / 'config.json'} has {want}: pass --model with the model this run trained"
            )
    stored = arrays.open(leaves["embed"][0]).dtype.numpy_dtype
    cfg = cfg.replace(param_dtype=dtype or stored.name)
    out_dtype = resolve_dtype(cfg.param_dtype)
    if adapter:
        return _export_adapter(arrays, leaves, cfg, info, Path(out), picked)
    specs = _specs(cfg, leaves, out_dtype)
    block_bytes = block_bytes or max(math.prod(shape) for _, shape, _ in specs) * stored.itemsize
    if "checksums" not in info:
        log.warning("checkpoint %s records no checksums: its arrays are not verified", picked.path)
    tensors = _hf_tensors(arrays, leaves, cfg, out_dtype, block_bytes, info.get("checksums", {}))
    with _new_dir(Path(out)) as tmp:
        save_tensors_streaming(specs, tensors, tmp, max_shard_bytes)
        config = hf_config_dict(_abstract_model(cfg))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if cfg.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(cfg.generation_config, indent=2))
        for file in TOKENIZER_FILES:  # verbatim: no need to load transformers (and torch) to re-save them
            if (source / file).is_file():
                shutil.copy2(source / file, tmp / file)
    print(f"wrote {len(specs)} tensors ({cfg.param_dtype}) to {out}")
    return Path(out)


def _export_adapter(arrays, leaves, cfg: ModelConfig, info: dict, out: Path, picked) -> Path:
    if cfg.lora is None:
        raise ExportError(f"{picked} is not a LoRA run's: it has no adapters; export it without --adapter")
    tensors = peft_tensors(cfg, lambda path: _read_whole(arrays, leaves, path, info.get("checksums", {})))
    with _new_dir(out) as tmp:
        write_adapter(tmp, cfg, tensors)
    print(f"wrote the LoRA adapters (rank {cfg.lora.rank}, {len(tensors)} tensors) in peft's format to {out}")
    return out
