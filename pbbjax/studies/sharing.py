"""Stages that several runs of a study train alike, trained once per seed.

Most studies compare runs that differ only after their first stage: the ``replay`` study's two runs differ in
stage 2's replay, the ``ciphers`` study's three in stage 2's rows. Their shared stages make up most of
the compute (stage 1 is 95 of the main job's 128 steps). ``StudyRunner`` trains such a prefix once, in
``<workdir>/_shared/seed<k>/<key>`` (``train.stop_after``: the run stops after that stage with its checkpoint,
evaluation and stage ends saved), and starts each run from a copy of it, where the run resumes as it would
after a restart at that stage's end. So a run's records are the ones it gives when trained alone
(``tests/studies/test_sharing.py`` checks it), and its config digest is unchanged.

Two runs share stages 1..k when everything that decides them up to stage k's end is equal: the config
outside ``data`` (which acts through the curriculum, except ``data.cot`` and ``data.stage1_domain``, which
the runner also reads) and outside ``rl`` unless a GRPO stage or its warm-up is among them, and the built
curriculum up to stage k (each stage's name, start point and rows, the instructions and the evaluation
sets). So SFT and GRPO runs share the SFT stages before their GRPO stage.

Only one process with a local workdir shares (a pod's hosts would each copy; gs:// checkpoints are not
copied here): elsewhere every run trains all its stages.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pbbjax.config.run_config import build_config_curriculum, build_run_config
from pbbjax.core.distributed import joins_pod
from pbbjax.core.storage import is_remote
from pbbjax.training.tracking import RUN_ID_FILE

DONE = "SHARED_PREFIX_DONE"  # written in a prefix directory once its run has stopped after its last stage


def stage_keys(config, canonical: dict) -> list[tuple[str, str]]:
    """Per stage of ``config``'s curriculum, (its name, the digest of what the run computes up to its end);
    ``canonical``: the config as a dict without the fields that do not change what a run computes."""
    rc = build_run_config(config)
    _, curriculum = build_config_curriculum(rc)
    outside = {k: v for k, v in canonical.items() if k not in ("data", "rl")}
    read = {k: canonical.get("data", {}).get(k) for k in ("cot", "stage1_domain")}
    fixed = (read, curriculum.instructions, curriculum.eval_sets, curriculum.representation)
    h = hashlib.sha256(json.dumps(outside, sort_keys=True).encode() + repr(fixed).encode())
    keys, rl = [], json.dumps(canonical.get("rl"), sort_keys=True).encode()
    for stage in curriculum.stages:
        if rl and (stage.name in rc.rl_stages or stage.warmup_for):  # GRPO settings act from here on
            h.update(rl)
            rl = b""
        h.update(repr((stage.name, stage.start_from, stage.warmup_for, stage.rows)).encode())
        keys.append((stage.name, h.copy().hexdigest()[:16]))
    return keys


def shared_prefix(keys: dict[str, list[tuple[str, str]]], run: str) -> int:
    """How many leading stages ``run`` shares with another run (0: none)."""
    mine = keys[run]
    best = 0
    for other, theirs in keys.items():
        if other != run:
            n = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
            best = max(best, min(len(mine), len(theirs)) if n is None else n)
    return min(best, len(mine) - 1)  # a run whose every stage another also trains still trains its last


def can_share(config) -> bool:
    """Whether this process may share stages between runs (see the module docstring)."""
    return not is_remote(config.workdir) and not joins_pod(config.distributed)


def start_from_prefix(prefix: Path, workdir: Path) -> None:
    """``workdir`` as the prefix run left its own (checkpoints, stage ends, results, metrics: copies, since
    the run appends to and deletes from them); the run then resumes from the prefix's last checkpoint. Not
    the prefix's W&B run id: each run is its own W&B run (whose history starts where it resumes). Only for a
    workdir without checkpoints of its own: whatever else it holds is replaced."""
    tmp = workdir.with_name(workdir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(prefix, tmp, ignore=shutil.ignore_patterns(DONE, RUN_ID_FILE))
    shutil.rmtree(workdir, ignore_errors=True)
    tmp.rename(workdir)
