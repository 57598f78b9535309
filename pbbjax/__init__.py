"""pbbjax: Programming by Backprop (Cook et al., arXiv 2506.18777) in JAX/Flax."""

from pbbjax.inference.sampler import generate
from pbbjax.models.architecture import LoRAConfig, ModelConfig
from pbbjax.models.default_model import default_model_path
from pbbjax.models.hf_io import load_model, save_model
from pbbjax.models.lora_io import save_adapter
from pbbjax.models.sharding import make_mesh

__all__ = [
    "LoRAConfig",
    "ModelConfig",
    "default_model_path",
    "generate",
    "load_model",
    "make_mesh",
    "save_adapter",
    "save_model",
]
