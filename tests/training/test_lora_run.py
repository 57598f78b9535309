"""A LoRA run of the trainer on the tiny preset: its exports, resume from a mid-stage checkpoint, and the
export CLI (merged and peft adapter) against the run's own exports and against peft on transformers."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_logits, load_config, train_cli
from safetensors.numpy import load_file

from pbbjax.training.export import export_checkpoint

ROOT = Path(__file__).parents[2]
LORA = (
    "--config", "configs/proactive.py:tiny",
    "--config.train.steps=4",
    "--config.train.checkpoint_every=2",
    "--config.train.keep_checkpoints=10",
    "--config.eval.generate=False",
    "--config.model.lora.rank=4",
    "--config.model.lora.alpha=8",
    "--config.model.lora.targets=q_proj,v_proj,o_proj,down_proj",
    "--config.model.lora.dropout=0.1",  # the resume test then checks that dropout resumes exactly too
)  # fmt: skip
ADAPTER = "adapter_model.safetensors"


def _train(workdir) -> str:
    return train_cli(LORA, workdir)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(path / ADAPTER) if (path / ADAPTER).exists() else load_file(path / "model.safetensors")


def _assert_equal(a: Path, b: Path):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora_run")
    _train(workdir)
    return workdir


def test_run_exports_the_merged_model_and_the_adapters(run):
    config = json.loads((run / "export" / "stage2-adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == sorted(["q_proj", "v_proj", "o_proj", "down_proj"])
    adapters = _tensors(run / "export" / "stage2-adapter")
    assert len(adapters) == 2 * 4 * 2  # A and B of 4 projections in 2 layers
    assert any(np.abs(t).max() > 0 for k, t in adapters.items() if "lora_B" in k), "B trained off zero"
    merged, base = _tensors(run / "export" / "stage2"), load_file(run / "tiny_model" / "model.safetensors")
    assert merged.keys() == base.keys()
    for k in base:  # only the adapted projections differ from the base
        changed = not np.array_equal(merged[k], base[k])
        assert changed == any(f"{p}.weight" in k for p in config["target_modules"]), k


def test_resume_from_a_mid_stage_checkpoint_ends_with_the_same_adapters(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    for path in (workdir / "checkpoints").iterdir():  # as if killed after stage 1's step 2
        if path.name.isdigit() and int(path.name) > 2:
            shutil.rmtree(path)
    shutil.rmtree(workdir / "export")
    (workdir / "results.json").unlink()
    out = _train(workdir)
    assert "resuming from checkpoint 2" in out
    for stage in ("stage1", "stage1-adapter", "stage2", "stage2-adapter"):
        _assert_equal(workdir / "export" / stage, run / "export" / stage)


def test_export_cli_merges_or_writes_the_adapters_for_peft(run, tmp_path):
    import transformers
    from peft import PeftModel

    export_checkpoint(run, tmp_path / "merged")
    _assert_equal(tmp_path / "merged", run / "export" / "stage2")
    export_checkpoint(run, tmp_path / "adapter", adapter=True)
    _assert_equal(tmp_path / "adapter", run / "export" / "stage2-adapter")
    # peft's adapter on the base == the merged model, both in transformers
    ids = np.random.default_rng(0).integers(0, 1000, (2, 12))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(run / "tiny_model").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert np.abs(hf_logits(peft_model, ids) - hf_logits(merged, ids)).max() < 1e-4
    with pytest.raises(Exception, match="not a LoRA run"):
        full = tmp_path / "full"
        shutil.copytree(run, full)
        info = next((full / "checkpoints").glob("*/info"))
        _strip_lora_fingerprint(info)
        export_checkpoint(info.parent, tmp_path / "none", adapter=True)


def test_evaluate_restores_the_adapters_the_checkpoint_names(run):
    import transformers

    from pbbjax.config.run_config import build_run_config
    from pbbjax.training.restore import load_for_eval

    config = load_config("configs/proactive.py:tiny")  # no model.lora given: the checkpoint's fingerprint
    model, _, label, _ = load_for_eval(build_run_config(config), run, stage="stage2")
    assert label == "stage2-step8" and model.cfg.lora.rank == 4
    ids = np.random.default_rng(1).integers(0, 1000, (2, 12))
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "export" / "stage2").eval()
    assert np.abs(np.asarray(model(ids)) - hf_logits(merged, ids)).max() < 1e-4


def _strip_lora_fingerprint(info_dir: Path):
    """The checkpoint's recorded fingerprint without its LoRA entry (as a full finetuning run writes)."""
    for file in info_dir.rglob("*"):
        if file.is_file() and b'"lora"' in file.read_bytes():
            data = json.loads(file.read_text())
            data["fingerprint"].pop("lora")
            file.write_text(json.dumps(data))
