"""Hugging Face safetensors <-> pbbjax parameters: one mapping table, used in both directions.

Loading is tensor by tensor and slice by slice: every parameter is built with
``jax.make_array_from_callback``, whose callback reads from the memory-mapped safetensors file only the
rows its device shard needs. Host memory therefore peaks near one shard of the largest tensor, and on a
multi-host pod each host reads only the slices of the devices it owns.

Saving gathers one layer's tensor at a time, converts it to the HF layout and writes shards of at most
``max_shard_bytes`` (plus ``model.safetensors.index.json`` when there are several). A projection with LoRA
adapters is saved merged: its base tensor plus the adapters' update (``lora.hf_delta``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pbbjax.models.architecture import ModelConfig
from pbbjax.models.lora import adapter_names, hf_delta
from pbbjax.models.sharding import to_host

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes or does not use.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match the model: missing, unexpected or mis-shaped."""


# How an HF tensor relates to ours (ours per layer, i.e. without the leading `layers` axis):
#   same       identical layout
#   linear     HF [out, in]       <-> ours [in, out]
#   heads_in   HF [N*H, D]        <-> ours [D, N, H]   (q/k/v projections)
#   heads_out  HF [D, N*H]        <-> ours [N, H, D]   (o projection)
#   heads_bias HF [N*H]           <-> ours [N, H]
def param_table(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(our parameter path, HF tensor name, kind). ``{i}`` in a name stands for the layer index."""
    a, m = "model.layers.{i}.self_attn", "model.layers.{i}.mlp"
    rows = [
        ("embed", "model.embed_tokens.weight", "same"),
        ("final_norm", "model.norm.weight", "same"),
        ("layers.input_norm", "model.layers.{i}.input_layernorm.weight", "same"),
        ("layers.post_attn_norm", "model.layers.{i}.post_attention_layernorm.weight", "same"),
        ("layers.attn.q_proj", f"{a}.q_proj.weight", "heads_in"),
        ("layers.attn.k_proj", f"{a}.k_proj.weight", "heads_in"),
        ("layers.attn.v_proj", f"{a}.v_proj.weight", "heads_in"),
        ("layers.attn.o_proj", f"{a}.o_proj.weight", "heads_out"),
        ("layers.mlp.gate_proj", f"{m}.gate_proj.weight", "linear"),
        ("layers.mlp.up_proj", f"{m}.up_proj.weight", "linear"),
        ("layers.mlp.down_proj", f"{m}.down_proj.weight", "linear"),
    ]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head", "lm_head.weight", "linear"))
    if cfg.qkv_bias:
        rows += [(f"layers.attn.{x}_bias", f"{a}.{x}_proj.bias", "heads_bias") for x in "qkv"]
    if cfg.o_bias:
        rows.append(("layers.attn.o_bias", f"{a}.o_proj.bias", "same"))
    if cfg.qk_norm:
        rows += [(f"layers.attn.{x}_norm", f"{a}.{x}_norm.weight", "same") for x in "qk"]
    if cfg.mlp_bias:
        rows += [(f"layers.mlp.{x}_bias", f"{m}.{x}_proj.bias", "same") for x in ("gate", "up", "down")]
    return rows


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our per-layer shape -> the HF tensor's shape."""
    if kind == "linear":
        return (shape[1], shape[0])
    if kind == "heads_in":
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":
        return (shape[2], shape[0] * shape[1])
    if kind == "heads_bias":
        return (shape[0] * shape[1],)
    return tuple(shape)


def to_hf(kind: str, x: np.ndarray) -> np.ndarray:
    """One layer's tensor in our layout -> HF layout."""
    if kind == "linear":
        return x.T
    if kind == "heads_in":
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_out":
        return x.reshape(-1, x.shape[2]).T
    if kind == "heads_bias":
        return x.reshape(-1)
    return x


def _read_ours(read: Callable, kind: str, idx: tuple[slice, ...], head_dim: int) -> np.ndarray:
    """Read the region ``idx`` of our per-layer layout from an HF tensor, touching only the rows needed."""
    if kind == "same":
        return read(idx)
    if kind == "linear":
        return read((idx[1], idx[0])).T
    if kind == "heads_in":  # idx = (d, n, h)
        d, n, h = idx
        x = read((slice(n.start * head_dim, n.stop * head_dim), d))
        return x.T.reshape(x.shape[1], n.stop - n.start, head_dim)[:, :, h]
    if kind == "heads_out":  # idx = (n, h, d)
        n, h, d = idx
        x = read((d, slice(n.start * head_dim, n.stop * head_dim)))
        return x.T.reshape(n.stop - n.start, head_dim, x.shape[0])[:, h, :]
    if kind == "heads_bias":  # idx = (n, h)
        n, h = idx
        return read((slice(n.start * head_dim, n.stop * head_dim),)).reshape(n.stop - n.start, head_dim)[:, h]
    raise ValueError(f"unknown tensor kind {kind!r}")


class SafetensorsDir:
    """The tensors of an HF model directory (single file or sharded with an index), opened lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"no weights in {self.path}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
            )
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        for f in files:
            if not (self.path / f).is_file():
                raise FileNotFoundError(f"weight file {self.path / f} is missing (listed in {INDEX_FILE})")
        self.file_of = weight_map or {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}  # noqa: SIM118 (not iterable)

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(
                    safe_open(self.path / file, framework="numpy")
                )
            except Exception as e:
                raise CheckpointError(f"cannot read safetensors file {self.path / file}: {e}") from e
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def read(self, name: str, idx: tuple[slice, ...]) -> np.ndarray:
        return self._open(self.file_of[name]).get_slice(name)[idx]

    def close(self):
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _flat_params(abstract_model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param))}


def _layer_names(hf_name: str, cfg: ModelConfig, stacked: bool) -> list[str]:
    return [hf_name.format(i=i) for i in range(cfg.num_layers)] if stacked else [hf_name]


def check_tensors(src: SafetensorsDir, abstract_model: nnx.Module) -> None:
    """Every expected tensor present with the right shape, nothing unexpected; errors name the tensor."""
    cfg, params = abstract_model.cfg, _flat_params(abstract_model)
    expected = {}
    for path, hf_name, kind in param_table(cfg):
        stacked = path.startswith("layers.")
        shape = params[path].shape[1:] if stacked else params[path].shape
        for name in _layer_names(hf_name, cfg, stacked):
            expected[name] = hf_shape(kind, shape)
    missing = sorted(set(expected) - set(src.file_of))
    if missing:
        raise CheckpointError(f"{src.path}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}")
    for name, shape in expected.items():
        found = src.shape(name)
        if found != shape:
            raise CheckpointError(f"{src.path}: tensor {name!r} has shape {found}, the model expects {shape}")
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in set(src.file_of) - set(expected) - allowed if not n.endswith(IGNORED_SUFFIXES)
    )
    if unexpected:
        raise CheckpointError(f"{src.path}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")


def load_params(src: SafetensorsDir, abstract_model: nnx.Module, shardings: dict[str, jax.sharding.Sharding]):
    """Build every parameter on its sharding from ``src``; returns {path: jax.Array}."""
    cfg, params = abstract_model.cfg, _flat_params(abstract_model)
    arrays = {}
    for path, hf_name, kind in param_table(cfg):
        var = params[path]
        stacked = path.startswith("layers.")
        names = _layer_names(hf_name, cfg, stacked)
        dtype = var.dtype
        cache: dict = {}

        def callback(
            index, names=names, kind=kind, stacked=stacked, shape=var.shape, dtype=dtype, cache=cache
        ):
            idx = tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape, strict=True))
            key = tuple((s.start, s.stop) for s in idx)
            if key not in cache:  # replicated shards ask for the same region once per device
                layers, inner = (range(*idx[0].indices(len(names))), idx[1:]) if stacked else ([0], idx)
                parts = [
                    _read_ours(lambda r, n=names[i]: src.read(n, r), kind, inner, cfg.head_dim)
                    for i in layers
                ]
                cache[key] = np.asarray(np.stack(parts) if stacked else parts[0], dtype=dtype)
            return cache[key]

        arrays[path] = jax.make_array_from_callback(var.shape, shardings[path], callback)
        cache.clear()
    return arrays


def iter_hf_tensors(model: nnx.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) for every tensor, one layer at a time, LoRA adapters merged into their base;
    gathers across hosts when needed."""
    cfg, params = model.cfg, _flat_params(model)
    for path, hf_name, kind in param_table(cfg):
        value = params[path][...]
        stacked = path.startswith("layers.")
        a_path, b_path = adapter_names(path)
        for i, name in enumerate(_layer_names(hf_name, cfg, stacked)):
            x = to_hf(kind, to_host(value[i] if stacked else value))
            if a_path in params:  # adapters only exist on the stacked projections
                a, b = (to_host(params[p][...][i]) for p in (a_path, b_path))
                x = (x.astype(np.float32) + hf_delta(a, b, cfg.lora.scale)).astype(x.dtype)
            yield name, x


def save_tensors(tensors: Iterator[tuple[str, np.ndarray]], out_dir: Path, max_shard_bytes: int, write: bool):
    """Write shards (``model-0000k-of-0000n.safetensors`` + index, or one ``model.safetensors``)."""
    shards: list[list[str]] = [[]]
    shard_files, weight_map, current, size, total = [], {}, {}, 0, 0

    def flush():
        nonlocal current, size
        if current and write:
            file = f"shard-{len(shard_files):05d}.tmp"
            save_file(
                {k: np.ascontiguousarray(v) for k, v in current.items()}, out_dir / file, {"format": "pt"}
            )
            shard_files.append(file)
        elif current:
            shard_files.append(None)
        current, size = {}, 0

    for name, x in tensors:
        if current and size + x.nbytes > max_shard_bytes:
            flush()
            shards.append([])
        current[name] = x
        shards[-1].append(name)
        size += x.nbytes
        total += x.nbytes
    flush()
    if not write:
        return
    n = len(shard_files)
    if n == 1:
        (out_dir / shard_files[0]).rename(out_dir / SINGLE_FILE)
        return
    for k, (file, names) in enumerate(zip(shard_files, shards, strict=True)):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        (out_dir / file).rename(out_dir / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def save_tensors_streaming(
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Iterator[tuple[str, np.ndarray]],
    out_dir: Path,
    max_shard_bytes: int,
) -> None:
    """``save_tensors``' files and index, holding one tensor at a time instead of a shard.

    ``specs`` lists every tensor's (HF name, shape, dtype) in order, so each shard's header is written
    before its data; each tensor from ``tensors`` (the same order) is then appended to its shard.
    """
    shards: list[list[tuple[str, tuple[int, ...], np.dtype, int]]] = [[]]
    size = total = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), np.dtype(dtype), nbytes))
        size += nbytes
        total += nbytes
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    tensors = iter(tensors)
    for file, shard in zip(files, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in shard:
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype.name],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data start 8-byte aligned, as safetensors writes them
        with open(out_dir / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape, dtype, _ in shard:
                got, x = next(tensors)
                if (got, x.shape, x.dtype) != (name, shape, dtype):
                    raise ValueError(f"expected tensor {name} {shape} {dtype}, got {got} {x.shape} {x.dtype}")
                f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
                del x  # dropped before the next tensor is produced
    if next(tensors, None) is not None:
        raise ValueError("more tensors than specs")
    if n > 1:
        weight_map = {name: file for file, shard in zip(files, shards, strict=True) for name, *_ in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
