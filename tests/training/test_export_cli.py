"""``python -m pbbjax.export`` on the tiny run's checkpoints: transformers loads what it writes and gives the
logits of the runner's own stage exports; --stage / --step selection; its errors; one tensor at a time."""

import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
import transformers
from conftest import hf_logits, train_cli
from etils import epath
from flax import nnx
from safetensors.numpy import load_file

import pbbjax.training.export
from pbbjax import load_model
from pbbjax.models.sharding import make_mesh
from pbbjax.training.checkpoint import Checkpointer, _checksum
from pbbjax.training.export import (
    CheckpointArrays,
    ExportError,
    checksum_part,
    export_checkpoint,
    find_checkpoints,
)

ROOT = Path(__file__).parents[2]
# Three steps a stage, a checkpoint every two: steps 2, 3 (end of stage1), 5, 6 (end of stage2); 3 kept.
RUN = [
    "--config",
    "configs/proactive.py:tiny",
    "--config.train.steps=3",
    "--config.train.checkpoint_every=2",
    "--config.eval.generate=False",  # losses only: the export needs no accuracies
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_cli(RUN, workdir)
    return workdir


def _cli(*args):
    cmd = [sys.executable, "-m", "pbbjax.export", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    index = hf_dir / "model.safetensors.index.json"
    files = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    return {k: v for f in files for k, v in load_file(hf_dir / f).items()}


def _assert_same_model(exported: Path, reference: Path):
    """transformers on ``exported`` gives pbbjax's logits of ``reference``, and the tensors are identical."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ours, _ = load_model(reference)
    ids = np.random.RandomState(0).randint(0, hf.config.vocab_size, (2, 16))
    assert np.abs(hf_logits(hf, ids) - np.asarray(ours(ids))).max() <= 1e-5
    want, got = _tensors(reference), _tensors(exported)
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(want[k], got[k]), k


def test_runner_writes_the_source_model(run):
    source, tiny = run / "source_model", run / "tiny_model"
    assert json.loads((source / "config.json").read_text()) == json.loads((tiny / "config.json").read_text())
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (source / f).read_bytes() == (tiny / f).read_bytes(), f


def test_cli_exports_the_newest_checkpoint_in_shards(run, tmp_path):
    out = tmp_path / "hf"
    done = _cli("--checkpoint", run, "--out", out, "--max-shard-bytes", 4_000_000)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 6 (stage 'stage2'" in done.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    _assert_same_model(out, run / "export" / "stage2")
    # config, generation config and tokenizer: byte for byte what the runner's save_model wrote
    others = sorted(p.name for p in (run / "export" / "stage2").iterdir() if p.name != "model.safetensors")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("model")) == others
    for name in others:
        assert (out / name).read_bytes() == (run / "export" / "stage2" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left behind


def test_cli_stage_picks_the_newest_checkpoint_of_that_stage(run, tmp_path):
    done = _cli("--checkpoint", run / "checkpoints", "--out", tmp_path / "hf", "--stage", "stage1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 3 (stage 'stage1'" in done.stdout
    _assert_same_model(tmp_path / "hf", run / "export" / "stage1")


def test_step_picks_a_global_step_mid_stage(run, tmp_path):
    found, workdir = find_checkpoints(run / "checkpoints" / "5")
    assert workdir == run and [(c.step, c.stage, c.stage_step) for c in found] == [(5, "stage2", 2)]
    out = export_checkpoint(run, tmp_path / "hf", step=5, dtype="bfloat16")
    with ocp.StandardCheckpointer() as c:
        saved = c.restore(epath.Path(run / "checkpoints" / "5" / "state"))["params"]
    model, _ = load_model(out, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        want = saved
        for key in path:
            want = want[key]
        assert np.array_equal(np.asarray(var[...]), np.asarray(want["value"]).astype(jnp.bfloat16)), path


def test_stage_end_of_a_branched_stage_saved_from_8_devices(run, tmp_path):
    """stage_ends/<stage>/ is used when the stage's own checkpoints are gone; written from an FSDP mesh,
    its arrays are stored as one chunk per device shard, which the export reads a chunk at a time."""
    workdir = tmp_path / "run"
    shutil.copytree(run / "source_model", workdir / "source_model")
    shutil.copytree(run / "checkpoints" / "6", workdir / "checkpoints" / "6")
    model, _ = load_model(run / "export" / "stage1", mesh=make_mesh(fsdp=8))
    fingerprint = json.loads((run / "checkpoints" / "6" / "info" / "metadata").read_text())["fingerprint"]
    with Checkpointer(
        workdir / "stage_ends" / "stage1", keep=1, fingerprint=fingerprint, async_save=False
    ) as c:
        c.save(0, {"params": nnx.state(model)}, {"stage": "stage1"})  # as the runner saves a stage end
    stored = CheckpointArrays(workdir / "stage_ends" / "stage1" / "0").open("params.layers.mlp.up_proj.value")
    assert stored.chunk_layout.read_chunk.shape == (2, 8, 128), "one chunk per device shard"
    export_checkpoint(workdir, tmp_path / "end", stage="stage1", block_bytes=1)
    _assert_same_model(tmp_path / "end", run / "export" / "stage1")
    export_checkpoint(workdir / "stage_ends" / "stage1", tmp_path / "direct")
    _assert_same_model(tmp_path / "direct", run / "export" / "stage1")
    export_checkpoint(workdir, tmp_path / "newest")  # the newest is still the newest global step
    _assert_same_model(tmp_path / "newest", run / "export" / "stage2")


def test_holds_one_tensor_at_a_time_and_reads_each_parameter_once(run, tmp_path, monkeypatch):
    """Every array read from the checkpoint and every tensor handed to the writer is tracked until it is
    freed: how many are alive at once, not how long anything takes."""
    live, events, names = {}, [], []

    def track(x):
        live[id(x)] = x.nbytes
        weakref.finalize(x, live.pop, id(x), None)
        events.append(len(live))

    read = CheckpointArrays.read

    def tracked_read(self, name, rows):
        x = read(self, name, rows)
        names.append((name, x.size))
        track(x)
        return x

    save = pbbjax.training.export.save_tensors_streaming

    def tracked_save(specs, tensors, out_dir, max_shard_bytes):
        def tracked():
            for item in tensors:
                track(item[1])
                yield item
                del item

        return save(specs, tracked(), out_dir, max_shard_bytes)

    monkeypatch.setattr(CheckpointArrays, "read", tracked_read)
    monkeypatch.setattr(pbbjax.training.export, "save_tensors_streaming", tracked_save)
    out = export_checkpoint(run, tmp_path / "hf", block_bytes=1)  # one layer per read
    tensors = _tensors(out)
    assert len(tensors) == 20 and max(events) <= 2, "at most one block read and one converted tensor alive"
    assert all(name.startswith("params.") for name, _ in names), "the optimizer state is never read"
    assert len(names) == len(tensors), "one read per tensor"
    assert sum(size for _, size in names) == sum(t.size for t in tensors.values()), "each element read once"
    _assert_same_model(out, run / "export" / "stage2")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_checksum_parts_add_up_to_the_checkpointers_checksum(dtype, monkeypatch):
    monkeypatch.setattr(pbbjax.training.export, "_CHECKSUM_PIECE", 7)  # several pieces per part
    x = np.asarray(jnp.asarray(np.random.RandomState(0).randn(3, 5, 4), dtype=dtype))
    parts = sum(checksum_part(x[i : i + 1], i * 20) for i in range(3)) % 2**32
    assert parts == checksum_part(x, 0) == int(_checksum(jnp.asarray(x)))


def _copy_step(run, tmp_path, step):
    workdir = tmp_path / "run"
    shutil.copytree(run / "source_model", workdir / "source_model")
    shutil.copytree(run / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
    return workdir, workdir / "checkpoints" / str(step)


def _flip_stored_embedding_byte(step_dir: Path):
    """Flip a byte in the middle of the stored (compressed) embedding chunk, found in the OCDBT data files."""
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"}).result()
    chunk = kv.read(b"params.embed.value/0.0").result().value
    for f in (step_dir / "state").rglob("d/*"):
        data = bytearray(f.read_bytes())
        at = data.find(chunk)
        if at >= 0:
            data[at + len(chunk) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
            return
    raise AssertionError("the embedding chunk is not in the data files")


def test_errors_name_the_path_and_what_is_missing(run, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no checkpoints in .*empty"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ExportError, match=r"nowhere is not a directory"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "o")
    stages = r"no checkpoint of stage 'stage9' in .*; stages present: \['stage1', 'stage2'\]"
    with pytest.raises(ExportError, match=stages):
        export_checkpoint(run, tmp_path / "o", stage="stage9")
    with pytest.raises(ExportError, match=r"step 4 is not among .*; steps present: \[3, 5, 6\]"):
        export_checkpoint(run, tmp_path / "o", step=4)
    with pytest.raises(ExportError, match=r"step 5 in .* belongs to stage 'stage2', not 'stage1'"):
        export_checkpoint(run, tmp_path / "o", step=5, stage="stage1")
    assert not (tmp_path / "o").exists()


def test_older_run_without_source_model_needs_model(run, tmp_path):
    workdir, _ = _copy_step(run, tmp_path, 6)
    shutil.rmtree(workdir / "source_model")
    with pytest.raises(ExportError, match=r"source_model/config.json is missing.*pass --model"):
        export_checkpoint(workdir, tmp_path / "o")
    export_checkpoint(workdir, tmp_path / "o", model=run / "tiny_model")
    _assert_same_model(tmp_path / "o", run / "export" / "stage2")


def _tamper_recorded_checksum(step_dir: Path):
    info = json.loads((step_dir / "info" / "metadata").read_text())
    info["checksums"]["['params']['embed'].value"][1] ^= 1
    (step_dir / "info" / "metadata").write_text(json.dumps(info))


CORRUPTIONS = {
    # TensorStore may decode a chunk with a flipped byte without complaint; the checksum catches it.
    "flipped_byte": (_flip_stored_embedding_byte, r"corrupted: (checksum mismatch for .*embed|reading)"),
    "recorded_checksum": (
        _tamper_recorded_checksum,
        r"corrupted: checksum mismatch for \['params'\]\['embed'\]",
    ),
    "deleted_data": (
        lambda d: [f.unlink() for f in (d / "state").rglob("d/*")],
        r"corrupted.*(cannot open|reading)",
    ),
    "bad_metadata": (
        lambda d: (d / "state" / "_METADATA").write_text("{not json"),
        r"corrupted: cannot read",
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_is_an_error_naming_it(run, tmp_path, corruption):
    workdir, step_dir = _copy_step(run, tmp_path, 6)
    damage, message = CORRUPTIONS[corruption]
    damage(step_dir)
    with pytest.raises(ExportError, match=message) as e:
        export_checkpoint(workdir, tmp_path / "o")
    assert str(step_dir) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"], "nothing written"


def test_cli_error_is_one_line(run, tmp_path):
    done = _cli("--checkpoint", run, "--out", tmp_path / "o", "--step", "4")
    assert done.returncode != 0
    assert "pbbjax.export: error: step 4 is not among the checkpoints" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()
