"""Shared fixtures: 8 simulated CPU devices, and tiny random Hugging Face models built on the spot."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Caches the tests fill (default model, leetcode screening) go to a fresh directory, not the user's.
os.environ.setdefault("PBBJAX_CACHE_DIR", __import__("tempfile").mkdtemp(prefix="pbbjax-test-cache-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tiny configs of each family, each chosen to exercise one feature of the decoder.
TINY = {
    "llama_gqa": dict(  # Llama, GQA 4:1, untied
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=128,
    ),
    "llama3_rope": dict(  # Llama 3.1 rope scaling with a tiny original context, so tests go beyond it
        model_type="llama",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "qwen2_tied": dict(  # Qwen2: q/k/v biases, tied embeddings
        model_type="qwen2",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "qwen3_head_dim": dict(  # Qwen3: q/k RMSNorm, head_dim 24 != hidden / heads = 16
        model_type="qwen3",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    "smollm2_shaped": dict(  # SmolLM2-135M's shape ratios: 9 heads, 3 KV heads, tied, theta 1e5
        model_type="llama",
        vocab_size=160,
        hidden_size=72,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
}


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A random transformers model of TINY[name], fp32, with norms and biases moved off their init."""
    import torch
    import transformers

    fields = {**TINY[name], **overrides}
    config = transformers.AutoConfig.for_model(**fields)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(0.5 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """{name: (transformers model, saved HF directory)} for every tiny config, built once."""
    out = {}
    for name in TINY:
        model = build_hf_model(name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def hf_logits(model, ids, **kwargs) -> np.ndarray:
    import torch

    with torch.no_grad():
        torch_kwargs = {k: torch.as_tensor(np.asarray(v)) for k, v in kwargs.items()}
        return model(torch.as_tensor(np.asarray(ids)), **torch_kwargs).logits.float().numpy()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The embedded default model converted into a fresh cache (not the user's)."""
    from pbbjax import default_model_path

    return default_model_path(cache_dir=tmp_path_factory.mktemp("pbbjax_cache"))


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers loading the same GGUF file: the independent reference for the real weights."""
    import torch
    import transformers

    from pbbjax.models.default_model import default_gguf_path

    gguf = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def train_cli(args, workdir) -> str:
    """``python -m pbbjax.train ARGS --config.workdir=WORKDIR`` in a subprocess (absl's flags are per
    process), from the repository root; asserts it succeeded and returns its output."""
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "pbbjax.train", *args, f"--config.workdir={workdir}"]
    done = subprocess.run(cmd, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def load_config(spec: str):
    """A configs/*.py file's config, as ``--config path[:preset]`` loads it."""
    import importlib.util
    from pathlib import Path

    path, _, preset = spec.partition(":")
    file = Path(__file__).parent.parent / path
    module_spec = importlib.util.spec_from_file_location("config_under_test", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset or None)


@pytest.fixture(scope="session")
def pbbjax_wheel(tmp_path_factory):
    """A wheel of this checkout (the package, pyproject.toml, README), built once per test session: what a
    non-editable install gets (the Colab notebook installs one)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    source = tmp_path_factory.mktemp("wheel-src")
    shutil.copytree(root / "pbbjax", source / "pbbjax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy(root / name, source / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."]
    subprocess.run(cmd, cwd=source, check=True, capture_output=True, timeout=300)
    (wheel,) = (source / "dist").glob("pbbjax-*.whl")
    return wheel
