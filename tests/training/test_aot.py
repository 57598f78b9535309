"""Paper-scale presets and compile-only mode: model files, presets, the memory estimate, AOT compiles for TPU
topologies (libtpu, no TPU), and the bad inputs of a pod run (a pod too small, a mesh that does not divide
the devices, a gs:// workdir without credentials)."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from conftest import load_config

from pbbjax.config import memory, presets
from pbbjax.config.run_config import build_run_config
from pbbjax.core import storage
from pbbjax.models.sharding import make_mesh
from pbbjax.training import aot

ROOT = Path(__file__).parents[2]
CURRICULA = ["proactive", "retroactive", "mixture", "ad"]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[test]' installs it); compile-only mode needs it",
)

# Published sizes (parameters, as the model cards round them) and vocabularies of the shipped configs.
PUBLISHED = {
    "qwen3-0.6b": (0.6e9, 151936),
    "qwen3-1.7b": (1.7e9, 151936),
    "qwen3-4b": (4.0e9, 151936),
    "qwen3-8b": (8.2e9, 151936),
    "qwen3-14b": (14.8e9, 151936),
    "llama-3.2-1b": (1.24e9, 128256),
    "llama-3.2-3b": (3.21e9, 128256),
    "llama-3.1-8b": (8.03e9, 128256),
}


def _train(*args, env=None, timeout=900):
    cmd = [sys.executable, "-m", "pbbjax.train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("name", sorted(presets.MODELS))
def test_model_file_builds_the_same_model_in_transformers(name):
    import torch
    import transformers

    hf = json.loads(presets.model_file(name).read_text())
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    reference = sum(p.numel() for p in model.parameters())
    cfg = presets.paper_model_config(name)
    assert cfg.num_params == reference
    size, vocab = PUBLISHED[name]
    assert cfg.vocab_size == vocab and abs(reference - size) / size < 0.02


def test_model_files_ship_in_the_wheel(pbbjax_wheel):
    """Presets and compile-only read the model files in non-editable installs too (the Colab notebook)."""
    import zipfile

    names = set(zipfile.ZipFile(pbbjax_wheel).namelist())
    for model in presets.MODELS:
        assert f"pbbjax/config/paper_models/{model}.json" in names, model


@pytest.mark.parametrize("curriculum", CURRICULA)
def test_every_curriculum_has_every_paper_preset(curriculum):
    for name in presets.MODELS:
        c = load_config(f"configs/{curriculum}.py:{name}")
        assert c.model.config_file == str(presets.model_file(name)) and c.model.scan_layers
        assert dict(c.mesh) == presets.MESH
        assert c.pipeline.batch_size % c.train.microbatches == 0


def test_pods_pick_microbatches_and_refuse_what_does_not_fit():
    assert load_config("configs/proactive.py:qwen3-14b,v5p-64").train.microbatches == 1
    assert load_config("configs/proactive.py:qwen3-4b,v5e-8").train.microbatches > 1
    assert set(presets.fitting_pods("qwen3-0.6b")) == set(presets.PODS)
    with pytest.raises(ValueError, match=r"qwen3-14b does not fit a v5e-8 .* pods it fits: .*v5p-16"):
        load_config("configs/proactive.py:qwen3-14b,v5e-8")
    with pytest.raises(ValueError, match=r"unknown pod 'v9-8'"):
        load_config("configs/proactive.py:qwen3-4b,v9-8")
    with pytest.raises(ValueError, match=r"the tiny preset takes no pod"):
        load_config("configs/proactive.py:tiny,v5p-8")


def test_estimate_of_state_matches_the_sharded_abstract_state():
    """The estimator's params and optimizer rows against the exact shard sizes of the abstract train state."""
    config = load_config("configs/proactive.py:qwen3-1.7b")
    ctx = aot.build_context(build_run_config(config), jax.devices())  # 8 CPU devices: fsdp=8
    est = memory.train_estimate(ctx.cfg, ctx.layout, batch=64, seq_len=1024)
    assert ctx.layout == memory.Layout(1, 8, 1)
    assert est["params"] == pytest.approx(aot.shard_bytes(ctx.params), rel=0.01)
    assert est["optimizer"] == pytest.approx(aot.shard_bytes(ctx.opt_state), rel=0.01)


def test_remat_policies_order_the_activation_estimate():
    cfg = presets.paper_model_config("qwen3-4b")
    kept = {
        p: memory.layer_activation_bytes(cfg, 2048, 1024, p)
        for p in ("full", "dots_no_batch", "dots", "none")
    }
    assert kept["full"] < kept["dots_no_batch"] < kept["none"]
    # dots keeps the fp32 attention scores (a dot's output), which with bf16 compute is more than the bf16
    # probabilities none keeps (attention.xla_attention), so dots is not ordered against none
    assert kept["full"] < kept["dots"]


def test_grpo_estimate_holds_one_chunk_of_completion_logits():
    """Qwen3-4B, 256 rollouts of 256 + 512 tokens on 8 chips (32 per chip): the log-probs' logits are one
    chunk of 16 positions x 32 rollouts and its gradient, not [32, 768, vocab]; the rest is the train
    step's."""
    cfg, layout = presets.paper_model_config("qwen3-4b"), memory.Layout(fsdp=8)
    grpo = memory.grpo_estimate(cfg, layout, batch=256, seq_len=768, max_new_tokens=512)
    assert grpo["logits"] == 2 * (16 * 32) * 151936 * 4
    train = memory.train_estimate(cfg, layout, batch=256, seq_len=768)
    assert grpo.pop("logits") < train.pop("logits")
    assert grpo == train


def test_mesh_that_does_not_divide_the_devices_names_both():
    devices = jax.devices()
    with pytest.raises(ValueError, match=r"mesh data=1 fsdp=3 tensor=1 needs 3 devices, 8 are available"):
        make_mesh(1, 3, 1, devices=devices)
    with pytest.raises(ValueError, match=r"8 devices cannot be split into data=1 fsdp=-1 tensor=3"):
        make_mesh(1, -1, 3, devices=devices)


@needs_libtpu
def test_compile_only_tiny_preset_on_a_tpu_topology():
    done = _train("--config", "configs/proactive.py:tiny", "--config.compile_only_topology=v5e:2x2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "4 devices (TPU v5 lite)" in out and "all steps fit" in out
    for step in ("train (sft)", "sample (prefill+decode)"):
        assert f"estimate for {step}" in out
    assert "XLA may use 15.75 GiB" in out


@needs_libtpu
def test_compile_only_grpo_preset_compiles_the_update_and_the_rollout_sampler():
    done = _train("--config", "configs/retroactive.py:rl-tiny", "--config.compile_only_topology=v5e:2x2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "all steps fit" in out
    for step in ("train (sft)", "train (grpo)", "sample (rollouts)"):
        assert f"estimate for {step}" in out


@needs_libtpu
def test_topology_the_preset_does_not_fit_fails_with_the_memory_table():
    done = _train("--config", "configs/proactive.py:qwen3-14b", "--config.compile_only_topology=v5e-4")
    assert done.returncode == 1, done.stderr[-3000:]
    out = done.stdout
    assert "DOES NOT FIT" in out and "arguments alone exceed HBM" in out
    assert "temporaries" in out and "optimizer" in out and "usable HBM" in out


@needs_libtpu
def test_compile_only_mesh_that_does_not_divide_the_topology():
    args = ["--config", "configs/proactive.py:tiny", "--config.compile_only_topology=v5e:2x2"]
    done = _train(*args, "--config.mesh.tensor=3")
    assert done.returncode != 0
    assert "on topology v5e:2x2: 4 devices cannot be split into data=1 fsdp=-1 tensor=3" in done.stderr


def test_unknown_topology_is_named():
    with pytest.raises(ValueError, match=r"compile_only_topology 'v9:1x1'.*v5p:4x4x2"):
        aot.topology_devices("v9:1x1")


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")


def test_gs_workdir_without_credentials_fails_before_any_compute(tmp_path, no_credentials):
    import os

    start = time.monotonic()
    done = _train(
        "--config",
        "configs/proactive.py:tiny",
        "--config.workdir=gs://pbbjax-no-such-bucket/run",
        env={**os.environ, "HOME": str(tmp_path)},
        timeout=120,
    )
    assert done.returncode != 0
    assert "WorkdirError: workdir 'gs://pbbjax-no-such-bucket/run' is on Google Cloud Storage, but no " in (
        done.stderr
    )
    assert not (ROOT / "gs:").exists() and time.monotonic() - start < 120


def test_gs_workdir_errors_name_the_workdir(tmp_path, no_credentials, monkeypatch):
    storage.check_workdir(str(tmp_path))  # a local workdir is not checked
    with pytest.raises(storage.WorkdirError, match="no Google credentials were found"):
        storage.check_workdir("gs://bucket/run")
    key = tmp_path / "key.json"
    key.write_text("{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))

    def denied(workdir):
        raise PermissionError("403 Forbidden")

    monkeypatch.setattr(storage, "_write_probe", denied)
    with pytest.raises(storage.WorkdirError, match=r"'gs://bucket/run' cannot be written \(PermissionError"):
        storage.check_workdir("gs://bucket/run")
    monkeypatch.setattr(storage, "_write_probe", lambda workdir: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(storage.WorkdirError, match="no answer from Google Cloud Storage within 1 s"):
        storage.check_workdir("gs://bucket/run", timeout_s=1.0)
    assert time.monotonic() - start < 10


@needs_libtpu
@pytest.mark.slow
def test_compile_only_qwen3_0_6b_fits_a_v5e_4():
    done = _train(
        "--config", "configs/proactive.py:qwen3-0.6b,v5e-4", "--config.compile_only_topology=v5e:2x2"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all steps fit" in done.stdout
