"""A run on a gs:// workdir end to end, against an in-memory stand-in for Google Cloud Storage.

fsspec's in-memory filesystem is registered for gs:// in these tests, so the credential check's probe,
the mirror's download at start and every upload go through the same calls as with gcsfs. The
checkpoints are the exception: orbax writes them through tensorstore's own GCS driver, which no fsspec
filesystem can stand in for, so here they go to a local directory (and the test checks that the runner
asks for them under the gs:// URL).
"""

import json
import sys
import tempfile
from pathlib import Path

import fsspec  # noqa: F401  (fsspec.registry below)
import numpy as np
import pytest
from conftest import load_config
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.numpy import load_file

from pbbjax.config.run_config import build_run_config
from pbbjax.core import storage
from pbbjax.training import export
from pbbjax.training import runner as runner_module
from pbbjax.training.run import train


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):  # as gcsfs: "gs://bucket/key" -> "bucket/key"
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return super()._strip_protocol(path)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    FakeGCS.clear_instance_cache()
    for protocol in FakeGCS.protocol:
        monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, FakeGCS)
    key = tmp_path / "key.json"
    key.write_text("{}")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the mirrors go
    (tmp_path / "tmp").mkdir()
    return FakeGCS()


def _bucket_files(fs, root="bucket/run"):
    return sorted(p[len(root) + 2 :] for p in fs.find(root))


def test_mirror_pull_push_and_urls(gcs, tmp_path):
    wd = storage.Workdir("gs://bucket/run/", mirror_root=tmp_path / "mirrors")
    assert wd.remote and wd.url("checkpoints") == "gs://bucket/run/checkpoints"
    assert wd.url("stage_ends", "stage1") == "gs://bucket/run/stage_ends/stage1"
    assert wd.local.parent == tmp_path / "mirrors"
    wd.pull("results.json")  # nothing there yet
    (wd.local / "plots").mkdir(parents=True)
    (wd.local / "plots" / "a.png").write_bytes(b"png")
    (wd.local / "results.json").write_text("{}")
    wd.push("plots", "results.json", "metrics.jsonl")  # no metrics yet: skipped
    assert _bucket_files(gcs) == ["plots/a.png", "results.json"]
    gcs.pipe("bucket/run/checkpoints/10/state", b"big")  # orbax's: never downloaded
    gcs.pipe("bucket/run/results.json", b'{"records": []}')
    fresh = storage.Workdir("gs://bucket/run", mirror_root=tmp_path / "other-vm")
    fresh.pull("results.json", "metrics.jsonl")
    assert (fresh.local / "results.json").read_text() == '{"records": []}'
    assert sorted(p.name for p in fresh.local.iterdir()) == ["results.json"]

    local = storage.Workdir(tmp_path / "run")
    assert not local.remote and local.local == tmp_path / "run"
    assert local.url("checkpoints") == str(tmp_path / "run" / "checkpoints")


def test_credential_check_writes_its_probe_through_fsspec(gcs):
    storage.check_workdir("gs://bucket/run")
    assert _bucket_files(gcs) == [], "the probe object is removed again"


def test_run_on_a_gs_workdir_uploads_its_files_and_resumes_on_a_fresh_machine(gcs, monkeypatch, tmp_path):
    checkpoint_urls = []

    def local_checkpoints(self, *parts):  # tensorstore's GCS driver cannot be faked: see the docstring
        checkpoint_urls.append("/".join([self.location, *parts]))
        return str(tmp_path / "checkpoints-of-the-bucket" / Path(*parts))

    monkeypatch.setattr(storage.Workdir, "url", local_checkpoints)
    config = load_config("configs/proactive.py:tiny")
    config.workdir = "gs://bucket/run"
    config.train.checkpoint_every = 2
    records = train(build_run_config(config))
    assert "gs://bucket/run/checkpoints" in checkpoint_urls

    files = _bucket_files(gcs)
    for name in ("results.json", "metrics.jsonl", "source_model/config.json", "export/stage2/config.json"):
        assert name in files, files
    assert any(f.startswith("plots/") and f.endswith(".png") for f in files)
    assert not any(f.startswith(("checkpoints/", "stage_ends/", "tiny_model/")) for f in files)
    uploaded = json.loads(gcs.cat_file("bucket/run/results.json"))
    assert uploaded["records"] == json.loads(json.dumps(records))
    lines = gcs.cat_file("bucket/run/metrics.jsonl").decode().splitlines()
    assert any("stage2/loss" in line for line in lines)

    # A restart on a fresh machine: an empty temp directory, the bucket and the checkpoints as they were.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "fresh-vm"))
    (tmp_path / "fresh-vm").mkdir()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("the restarted run evaluated again: results.json was not downloaded")

    monkeypatch.setattr(runner_module, "evaluate", no_evaluation)
    assert train(build_run_config(config)) == records
    mirror = storage.Workdir("gs://bucket/run").local
    assert mirror.is_relative_to(tmp_path / "fresh-vm") and (mirror / "results.json").exists()

    # `python -m pbbjax.export --checkpoint gs://...`: the listing, the checkpoints' metadata and the source
    # model come from the bucket; only the arrays are read locally (tensorstore's GCS driver, as above).
    local_root = tmp_path / "checkpoints-of-the-bucket"
    gcs.put(str(local_root) + "/", "bucket/run/", recursive=True)
    found, workdir = export.find_checkpoints("gs://bucket/run")
    want, _ = export.find_checkpoints(local_root)
    assert [(c.stage, c.step) for c in found] == [(c.stage, c.step) for c in want]
    assert str(workdir) == "gs://bucket/run" and str(found[-1].path).startswith("gs://bucket/run/")
    read_arrays = export.CheckpointArrays.__init__

    def arrays_read_locally(self, step_dir):
        read_arrays(self, Path(str(step_dir).replace("gs://bucket/run", str(local_root))))

    monkeypatch.setattr(export.CheckpointArrays, "__init__", arrays_read_locally)
    out = export.export_checkpoint("gs://bucket/run", tmp_path / "hf", stage="stage2")
    assert (out / "tokenizer.json").exists()
    exported = load_file(out / "model.safetensors")
    reference = load_file(mirror / "export" / "stage2" / "model.safetensors")
    assert exported.keys() == reference.keys()
    for name, value in reference.items():
        assert np.array_equal(exported[name], value), name
