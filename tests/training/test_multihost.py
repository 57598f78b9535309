"""pbbjax on a simulated 2-host pod (2 JAX processes x 4 CPU devices, ``python -m pbbjax.local_pod``),
each run against 1 process x 8 devices on the same config: training, evaluation, GRPO, sampling, export,
resume after SIGTERM / SIGKILL / a dead host, a corrupted checkpoint shard, and bad pod settings.

Every pod command runs under a timeout, so a hang fails the test instead of blocking CI.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_helpers import (
    ROOT,
    accuracies,
    assert_close_tensors,
    assert_equal_tensors,
    env,
    kill,
    losses,
    pod_processes,
    pod_script_results,
    run_pod,
    start_pod,
    wait_for_checkpoint,
)
from safetensors.numpy import load_file

# Four steps a stage, a checkpoint every two; evaluation of 5 rows in batches of 4 (rows that do not split
# evenly over the hosts: 4 + 1, and 5 generations padded to the 8 devices).
TINY = (
    "--config", "configs/proactive.py:tiny",
    "--config.train.steps=4",
    "--config.train.checkpoint_every=2",
    "--config.eval.max_rows=5",
    "--config.eval.batch_size=4",
    "--config.cluster.heartbeat_timeout_s=10",
)  # fmt: skip
FINAL = "export/stage2"
FAKES = Path(__file__).parents[1] / "fakes"  # a recording stand-in for wandb


def train(processes, devices, workdir, *extra, check=True):
    return run_pod(
        processes, devices, "pbbjax.train", *TINY, f"--config.workdir={workdir}", *extra, check=check
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny proactive run on the 2-host pod and on one process of 8 devices. The pod's run also traces
    steps 3-5 (across stage 1's end) and logs to wandb (the recording stand-in of tests/fakes): neither
    may change what it computes. Its output is kept in <pod>/pod_output.txt."""
    pod, one = tmp_path_factory.mktemp("pod"), tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKES), os.environ.get("PYTHONPATH")])))
        done = train(2, 4, pod, "--config.profile.steps=3,3", "--config.log.wandb=pbb-pod")
    (pod / "pod_output.txt").write_text(done.stdout + done.stderr)
    train(1, 8, one)
    return pod, one


def test_pod_run_equals_one_process(runs):
    pod, one = runs
    for stage in ("stage1", "stage2"):  # summation order differs over 8 devices of 1 or 2 hosts
        assert_close_tensors(pod / "export" / stage, one / "export" / stage, rtol=1e-5)
    assert accuracies(pod) == accuracies(one)
    lp, lo = losses(pod), losses(one)
    assert lp.keys() == lo.keys() and all(abs(lp[k] - lo[k]) <= 1e-5 * abs(lo[k]) for k in lo), (lp, lo)
    assert 5 in {r[3] for r in accuracies(pod)}  # the eval set's 5 rows were all scored, none lost to a split


def test_only_process_0_profiles_and_logs_to_wandb(runs):
    pod, _ = runs
    output = (pod / "pod_output.txt").read_text().splitlines()
    profiled = [line.split(" into ")[0] for line in output if "profile: traced" in line]
    assert profiled == ["profile: traced steps 3-4", "profile: traced step 5"]  # process 0's lines only
    assert len(list((pod / "profile").glob("plugins/profile/*/*.xplane.pb"))) >= 1
    calls = [json.loads(line) for line in (pod / "fake_wandb.jsonl").read_text().splitlines()]
    assert {c["process"] for c in calls} == {"0"} and [c["call"] for c in calls].count("init") == 1
    logged = [{"step": c["step"], **c["data"]} for c in calls if c["call"] == "log"]
    assert logged == [json.loads(line) for line in (pod / "metrics.jsonl").read_text().splitlines()]


def test_export_and_evaluate_clis_on_the_pod(runs, tmp_path):
    pod, _ = runs
    out = tmp_path / "exported"
    run_pod(2, 4, "pbbjax.export", "--checkpoint", str(pod), "--out", str(out))
    assert_equal_tensors(out, pod / FINAL)  # the newest checkpoint is stage 2's end
    evaluated = tmp_path / "evaluation"
    run_pod(
        2, 4, "pbbjax.evaluate", *TINY, "--checkpoint", str(pod), "--stage", "stage1", "--out", str(evaluated)
    )
    got = json.loads((evaluated / "results.json").read_text())["records"]
    want = [r for r in json.loads((pod / "results.json").read_text())["records"] if r["after"] == "stage1"]
    assert [(r["set"], r["n"], r["accuracy"]) for r in got] == [
        (r["set"], r["n"], r["accuracy"]) for r in want
    ]
    assert np.allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-6)


def test_grpo_preset_on_the_pod_equals_one_process(tmp_path):
    """GRPO after an SFT warm-up on its own rows (``rl.sft_warmup_steps``), on a pod and on one process."""
    pod, one = tmp_path / "pod", tmp_path / "one"
    for processes, devices, workdir in ((2, 4, pod), (1, 8, one)):
        run_pod(processes, devices, "pbbjax.train", "--config", "configs/retroactive.py:rl-tiny",
                "--config.train.eval_every=0", "--config.rl.sft_warmup_steps=2",
                f"--config.workdir={workdir}")  # fmt: skip
    assert_close_tensors(pod / FINAL, one / FINAL, rtol=1e-5)
    assert accuracies(pod) == accuracies(one)
    stages = json.loads((pod / "results.json").read_text())["stages"]
    assert [(s["name"], s["trainer"], s["start_from"]) for s in stages] == [
        ("stage1", "sft", None),
        ("stage2-warmup", "sft", "stage1"),
        ("stage2", "grpo", "stage2-warmup"),
    ]
    assert stages[1]["steps"] == 2
    logged = [json.loads(line) for line in (pod / "metrics.jsonl").read_text().splitlines()]
    assert sum("stage2/reward" in r for r in logged) == 4  # every GRPO iteration ran and logged
    assert sum("stage2-warmup/loss" in r for r in logged) == 2


def test_lora_run_on_the_pod_equals_one_process(tmp_path):
    """LoRA on a 2-host pod of 2 devices each against 1 process of 4: adapters sharded across hosts,
    trained, checkpointed and exported (merged, and in peft's format) alike."""
    pod, one = tmp_path / "pod", tmp_path / "one"
    lora = ("--config.model.lora.rank=4", "--config.eval.generate=False", "--config.train.steps=2")
    for processes, devices, workdir in ((2, 2, pod), (1, 4, one)):
        train(processes, devices, workdir, *lora)
    assert_close_tensors(pod / FINAL, one / FINAL, rtol=1e-5)
    adapters = [load_file(w / f"{FINAL}-adapter" / "adapter_model.safetensors") for w in (pod, one)]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 2 * 7 * 2
    for k, want in adapters[1].items():
        np.testing.assert_allclose(adapters[0][k], want, rtol=1e-5, atol=1e-6, err_msg=k)


def test_grpo_updates_on_the_pod_equal_one_process(hf_dirs, tmp_path):
    """A reward the tiny model earns (the preset's task reward is always 0 for a random model), so that
    rollouts gathered across hosts, advantages and updates are all compared."""
    results = pod_script_results("grpo_toy", str(hf_dirs["llama_gqa"][1]), out_dir=tmp_path)
    pod, one = results[2], results[1]
    assert np.array_equal(pod["rewards"], one["rewards"])  # the same rollouts
    assert len(set(pod["rewards"].tolist())) > 1  # and rewards that moved the policy
    for k in one:  # Adam near zero gradients: compare at 1e-4 as test_grpo's mesh test does
        np.testing.assert_allclose(pod[k], one[k], atol=1e-4, err_msg=k)


def test_segmented_sampler_on_the_pod_equals_one_process(hf_dirs, tmp_path):
    """Generation with rows over both hosts, the decode loop in one segment and in three: the pod and one
    process draw the same tokens, and segments change nothing."""
    results = pod_script_results("sample_segments", str(hf_dirs["llama_gqa"][1]), out_dir=tmp_path)
    pod, one = results[2], results[1]
    assert pod["tokens1"].shape == (10, 24) and 0 < pod["ended1"].sum() < 10  # some rows end early
    for got, k in [(pod, 1), (pod, 3), (one, 3)]:  # against one process, one segment
        for name in ("tokens", "lengths", "ended", "eos", "steps"):
            np.testing.assert_array_equal(got[f"{name}{k}"], one[f"{name}1"], err_msg=f"{name}{k}")
        np.testing.assert_allclose(got[f"logprobs{k}"], one["logprobs1"], rtol=1e-5, atol=1e-5)


def test_preemption_then_a_dead_host_then_resume_bitwise(runs, tmp_path):
    """SIGTERM (a spot VM's notice): every host saves at the same step and exits 143. Relaunched, then
    one host SIGKILLed (a VM gone): the other stops within bounded time. Relaunched again, the run ends
    with exactly the parameters of the uninterrupted pod run."""
    pod, _ = runs
    work = tmp_path / "interrupted"
    proc = start_pod(2, 4, "pbbjax.train", *TINY, f"--config.workdir={work}")
    wait_for_checkpoint(work, proc, 2)
    kill(proc, signal.SIGTERM)  # the launcher forwards it to both hosts
    output = proc.stdout.read()
    assert proc.returncode == 143, output[-4000:]
    assert "preempted: saved stage" in output
    saved = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved >= 2

    proc = start_pod(2, 4, "pbbjax.train", *TINY, f"--config.workdir={work}")
    wait_for_checkpoint(work, proc, saved + 1)
    host1 = [pid for pid, index in pod_processes(f"--config.workdir={work}").items() if index == "1"]
    assert len(host1) == 1
    t0 = time.monotonic()
    os.kill(host1[0], signal.SIGKILL)
    proc.wait(timeout=120)
    proc.stdout.close()
    assert proc.returncode != 0 and time.monotonic() - t0 < 90

    train(2, 4, work)
    assert_equal_tensors(work / FINAL, pod / FINAL)


def test_a_corrupted_shard_on_one_host_falls_back_on_both(runs, tmp_path):
    pod, _ = runs
    work = tmp_path / "corrupted"
    shutil.copytree(pod, work)
    newest = max((p for p in (work / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    data = [
        f for f in (newest / "state").rglob("*") if f.is_file() and "process_1" in str(f) and "/d/" in str(f)
    ]
    assert data, sorted(str(f) for f in (newest / "state").rglob("*"))
    for f in data:  # flip bytes in the middle of host 1's array data
        raw = bytearray(f.read_bytes())
        for i in range(len(raw) // 3, len(raw) // 3 + 64):
            raw[i] ^= 0xFF
        f.write_bytes(bytes(raw))
    (work / "results.json").unlink()  # so that the relaunch evaluates what it resumed
    done = train(2, 4, work)
    log = done.stdout + done.stderr
    said = [line for line in log.splitlines() if f"{newest} is unreadable" in line]
    assert any(line.startswith("[process 1]") for line in said), log[-4000:]  # both hosts fell back
    assert any(not line.startswith("[process") for line in said), log[-4000:]
    assert_equal_tensors(work / FINAL, pod / FINAL)  # retrained from the older step to the same end


def test_bad_pod_settings_fail_clearly_and_quickly(tmp_path):
    # a global batch that the hosts cannot split (tensor-parallel mesh, so the mesh accepts 3 rows)
    done = train(2, 4, tmp_path / "b", "--config.pipeline.batch_size=3", "--config.mesh.fsdp=1",
                 "--config.mesh.tensor=8", check=False)  # fmt: skip
    assert done.returncode != 0 and "pipeline.batch_size=3 is not divisible by 2 hosts" in done.stderr
    # a coordinator that never answers
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pbbjax.train", *TINY, f"--config.workdir={tmp_path / 'c'}",
           "--config.distributed=on", "--config.cluster.coordinator_address=127.0.0.1:1",
           "--config.cluster.num_processes=2", "--config.cluster.process_id=1",
           "--config.cluster.initialization_timeout_s=5"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - t0 < 100
    assert "could not join the pod through the coordinator at 127.0.0.1:1" in done.stderr, done.stderr[-3000:]
