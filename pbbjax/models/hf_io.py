"""``load_model`` and ``save_model``: Hugging Face model directories (or hub ids) in and out.

A loaded model is an ``nnx.Module`` whose parameters already sit on the requested mesh; ``save_model``
writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads, keeping every field
of the source ``config.json``. With ``lora``, the loaded model also carries fresh LoRA adapters
(``lora.py``), and ``save_model`` writes the merged weights (base + adapter update).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from pbbjax.models.architecture import LoRAConfig, ModelConfig, resolve_dtype
from pbbjax.models.decoder import Transformer
from pbbjax.models.hf_weights import SafetensorsDir, check_tensors, iter_hf_tensors, load_params, save_tensors
from pbbjax.models.lora import initial_adapters
from pbbjax.models.sharding import logical_to_spec

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, fetched (config, safetensors, tokenizer) when online."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model directory {name!r} does not exist (and is not a hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline, pass a local HF directory holding config.json, "
            f"*.safetensors and the tokenizer files."
        ) from e


def param_shardings(abstract_model: nnx.Module, mesh: Mesh | None) -> dict[str, jax.sharding.Sharding]:
    """{parameter path: sharding} from each parameter's logical ``axes`` and the rules table."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
        key = ".".join(map(str, path))
        if mesh is None:
            out[key] = SingleDeviceSharding(jax.devices()[0])
        else:
            out[key] = NamedSharding(mesh, logical_to_spec(var.get_metadata()["axes"], var.shape, mesh))
    return out


def abstract_model(cfg: ModelConfig, mesh: Mesh | None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, parameters as ``jax.ShapeDtypeStruct``s carrying their shardings on ``mesh``): the model
    without weights. What ``load_model`` fills, checkpoints restore into and ``pbbjax.training.aot``
    compiles."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh))
    shardings = param_shardings(abstract, mesh)
    graphdef, state = nnx.split(abstract)
    for path, var in nnx.to_flat_state(state):
        var.set_value(
            jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[".".join(map(str, path))])
        )
    return graphdef, state


def load_model(
    path_or_hub_id: str | os.PathLike,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    *,
    compute_dtype: str | None = None,
    scan_layers: bool = False,
    remat: str = "none",
    attention: str = "auto",
    tokenizer: bool = True,
    lora: LoRAConfig | None = None,
):
    """HF directory or hub id -> (Transformer, tokenizer or None if the directory has none).

    ``dtype`` is the parameter dtype (with ``lora``: the frozen base's); ``compute_dtype`` defaults to it.
    With a ``mesh``, parameters are created directly in their shards. ``lora`` adds adapters, initialised
    from its seed (``lora.initial_value``).
    """
    path = resolve_model_dir(path_or_hub_id)
    resolve_dtype(dtype)
    cfg = ModelConfig.from_dir(
        path,
        param_dtype=dtype,
        compute_dtype=compute_dtype or dtype,
        scan_layers=scan_layers,
        remat=remat,
        attention=attention,
        lora=lora,
        generation_config=_read_json(path / "generation_config.json") or {},
    )
    graphdef, state = abstract_model(cfg, mesh)
    abstract = nnx.merge(graphdef, state)
    shardings = {".".join(map(str, p)): v.get_value().sharding for p, v in nnx.to_flat_state(state)}
    with SafetensorsDir(path) as src:
        check_tensors(src, abstract)
        arrays = load_params(src, abstract, shardings)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    arrays |= initial_adapters(cfg, shardings, flat)
    for p, var in nnx.to_flat_state(state):
        key = ".".join(map(str, p))
        if key in arrays:
            var.set_value(arrays[key])
    model = nnx.merge(graphdef, state)
    return model, (load_tokenizer(path) if tokenizer else None)


def load_tokenizer(path: str | os.PathLike):
    """The directory's HF tokenizer (with its chat template), or None when it ships none."""
    path = Path(path)
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        log.info("%s has no tokenizer files; returning no tokenizer", path)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def hf_config_dict(model: Transformer) -> dict:
    """The source config.json with the fields this model defines brought up to date."""
    cfg = model.cfg
    hf = dict(cfg.hf_config)
    hf.setdefault("model_type", cfg.model_type)
    hf.setdefault("architectures", [ARCHITECTURES[cfg.model_type]])
    hf["dtype"] = cfg.param_dtype
    hf.pop("torch_dtype", None)
    return hf


def save_model(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    write: bool | None = None,
) -> Path:
    """Write an HF directory (config, safetensors shards + index, tokenizer, generation config).

    All processes take part in gathering; only process 0 writes (``write`` overrides that, for a model
    of host-local arrays that another host must write to its own disk). The directory appears whole:
    files go to a temporary sibling first, which then replaces ``out_dir``.
    """
    out_dir = Path(out_dir)
    write = jax.process_index() == 0 if write is None else write
    tmp = None
    if write:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_tensors(iter_hf_tensors(model), tmp, max_shard_bytes, write)
        if not write:
            return out_dir
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model), indent=2, sort_keys=True))
        if model.cfg.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(model.cfg.generation_config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
