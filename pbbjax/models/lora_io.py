"""LoRA adapters in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads onto the transformers model of the base weights.

Tensor names follow the HF kernel's (``hf_weights.param_table``): ``base_model.model.<module>.lora_A.weight``
``[rank, in]`` and ``lora_B.weight`` ``[out, rank]``, in fp32. ``save_adapter`` writes a live model's;
``pbbjax.export --adapter`` a checkpoint's, through ``peft_tensors`` and ``write_adapter``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from pbbjax.models.architecture import ModelConfig
from pbbjax.models.hf_io import _replace_dir
from pbbjax.models.hf_weights import param_table
from pbbjax.models.lora import LoRAParam, adapter_names, peft_layout
from pbbjax.models.sharding import to_host

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_names(hf_name: str) -> tuple[str, str]:
    """An HF kernel's name (``model.layers.0.self_attn.q_proj.weight``) -> peft's names of its A and B."""
    module = f"base_model.model.{hf_name.removesuffix('.weight')}"
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def adapted(cfg: ModelConfig) -> Iterator[tuple[str, str]]:
    """(our base path, HF name with ``{i}``) of each adapted projection, in ``param_table`` order."""
    for path, hf_name, _ in param_table(cfg):
        if cfg.lora is not None and path.rsplit(".", 1)[-1] in cfg.lora.targets:
            yield path, hf_name


def peft_tensors(cfg: ModelConfig, read: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """Every adapter in peft's names and layout, fp32; ``read(path)`` gives a whole stacked adapter."""
    out = {}
    for path, hf_name in adapted(cfg):
        a_path, b_path = adapter_names(path)
        a_all, b_all = read(a_path), read(b_path)
        for i in range(cfg.num_layers):
            a_name, b_name = peft_names(hf_name.format(i=i))
            out[a_name], out[b_name] = (t.astype(np.float32) for t in peft_layout(a_all[i], b_all[i]))
    return out


def adapter_config(cfg: ModelConfig, base_model: str = "") -> dict:
    """peft's ``adapter_config.json`` for ``cfg.lora``."""
    lora = cfg.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_adapter(out_dir: Path, cfg: ModelConfig, tensors: dict[str, np.ndarray], base_model: str = ""):
    """``adapter_config.json`` and ``adapter_model.safetensors`` in ``out_dir`` (which must exist)."""
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, base_model), indent=2))
    save_file(tensors, out_dir / ADAPTER_WEIGHTS, {"format": "pt"})


def save_adapter(model: nnx.Module, out_dir, base_model: str = "", *, write: bool | None = None) -> Path:
    """A LoRA model's adapters as a peft adapter directory ``out_dir`` (replaced whole). Every process
    takes part in gathering; process 0 writes (``write`` overrides that)."""
    cfg = model.cfg
    if cfg.lora is None:
        raise ValueError("the model has no LoRA adapters to save (model.lora.rank is 0)")
    params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    tensors = peft_tensors(cfg, lambda path: to_host(params[path][...]))
    out_dir = Path(out_dir)
    if not (jax.process_index() == 0 if write is None else write):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_adapter(tmp, cfg, tensors, base_model)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
