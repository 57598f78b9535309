"""``python -m pbbjax.study <name> [--preset cpu|tiny|<model>[,<pod>]] [--seeds 3]``: one of the paper's
studies (``pbbjax.studies.catalog``), every arm, every seed, then the comparison.

For each seed, then each run of the study, it trains the run's config (``pbbjax.training.run.train``) in
``<workdir>/<run>/seed<k>`` and copies the run's evaluation records to ``<out>/runs/<run>/seed<k>.json``.
Then it aggregates the arms over seeds (``pbbjax.studies.report``) into ``<out>/``:

- ``results.json``: every arm's accuracy per (set, mode), mean over seeds with a 95% interval, and the
  exchange rate where the study has one;
- ``table.md``: the same as a table (also printed);
- ``plots/*.png``: the study's figures in the paper's forms;
- ``configs/<run>.json``: each run's exact config (seed 0) and the ``python -m pbbjax.train`` command that
  trains it alone.

``--report-only`` only aggregates the records already in ``<out>`` (after changing how reports are
made, or to look at a finished study again); it never trains. ``--compile-only v5p:4x4x2`` only
AOT-compiles every run's steps for that TPU topology (no weights, no training; ``pbbjax.training.aot``) and
exits non-zero if one does not fit: the check that a paper-scale preset runs on a pod.

``<out>`` defaults to ``results/<name>/<preset>``, ``<workdir>`` to ``runs/study/<name>/<preset>``.
Compiled steps are cached on disk across arms (``~/.cache/pbbjax/jax`` unless ``JAX_COMPILATION_CACHE_DIR``
is set). Interrupted, the same command resumes: finished runs (their records present, from the same
config) are skipped, and the interrupted run resumes from its last checkpoint, step by step. A run's
checkpoints are deleted once its records are written (``--keep-checkpoints`` keeps them).

Runs of one seed that train their first stages alike (the same config outside ``data`` and the same
curriculum up to that stage) share them: those stages train once, in ``<workdir>/_shared/seed<k>/``, and
each run resumes from a copy (``pbbjax.studies.sharing``; the records are those of the run trained alone).
``--no-share`` trains every run whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pbbjax.core import console
from pbbjax.studies.catalog import STUDIES
from pbbjax.studies.runner import StudyRunner, enable_compilation_cache


def parse_set(items: list[str]) -> dict:
    """``--set data.epochs=3`` values: JSON where it parses (numbers, booleans, lists), else the string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", nargs="?", choices=sorted(STUDIES), help="the study to run")
    p.add_argument("--preset", default="cpu", help="tiny | cpu | demo | a paper-scale model preset [,pod]")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the study's own)")
    p.add_argument("--out", default=None, help="results folder (default results/<study>/<preset>)")
    p.add_argument("--workdir", default=None, help="run folders (default runs/study/<study>/<preset>)")
    p.add_argument("--set", action="append", default=[], help="a config override for every run: key=value")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoints")
    p.add_argument("--no-share", action="store_true", help="train every run whole, sharing no stages")
    p.add_argument("--list", action="store_true", help="list the studies and their arms")
    p.add_argument("--verbose", action="store_true", help=console.VERBOSE_HELP)
    p.add_argument("--report-only", action="store_true", help="only aggregate the records already in --out")
    p.add_argument(
        "--compile-only", default="", metavar="TOPOLOGY", help="only AOT-compile every run for a TPU topology"
    )
    args = p.parse_args(argv)
    if args.list or not args.study:
        for s in STUDIES.values():
            print(f"{s.name:15s} {s.figure:22s} runs: {', '.join(r.name for r in s.runs)}")
        return 0
    console.configure(args.verbose)
    if not args.compile_only:  # programs compiled for a device-less topology cannot be read back
        enable_compilation_cache()
    study = STUDIES[args.study]
    tag = args.preset.replace(",", "-")
    runner = StudyRunner(
        study,
        args.preset,
        args.seeds or study.seeds,
        Path(args.out or f"results/{study.name}/{tag}"),
        Path(args.workdir or f"runs/study/{study.name}/{tag}"),
        parse_set(args.set),
        share=not args.no_share,
    )
    if args.compile_only:
        return runner.compile_only(args.compile_only)
    if args.report_only:
        runner.report_only()
        return 0
    runner.run(keep_checkpoints=args.keep_checkpoints)
    return 0


if __name__ == "__main__":
    sys.exit(main())
