"""What the strict sandbox costs: the same work through it and through an earlier revision's sandbox.

The README and issue 21 cite this. Each round runs, in turn for each sandbox: arithmetic ground truth
(``execute_many`` of 200 programs x 20 inputs, one process), cipher ground truth (20 ciphers x 10 inputs,
one process each) and a leetcode screen of every kzleet solution (no disk cache; one process per
solution, ``--workers`` at once). It prints the median time of each over the rounds:

    python scripts/sandbox_overhead.py [--baseline-rev ffde809] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pbbjax.data.tasks import arithmetic, ciphers, leetcode
from pbbjax.data.tasks.base import get_domain
from pbbjax.data.tasks.leetcode_corpus import kzleet_problems
from pbbjax.data.tasks.sandbox import run_calls


def _baseline(rev: str):
    """``run_calls`` of ``pbbjax/data/tasks/sandbox.py`` at ``rev``."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:pbbjax/data/tasks/sandbox.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_sandbox.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.run_calls


def _workloads(workers: int) -> dict:
    arith = get_domain("arithmetic")
    programs = arith.instructions(200, seed=0)
    inputs = [arith.sample_inputs(p, 20, seed=0) for p in programs]
    cipher = get_domain("ciphers")
    codes = cipher.instructions(20, seed=0)
    texts = [cipher.sample_inputs(c, 10, seed=0) for c in codes]
    problems, excluded = kzleet_problems()
    screen = leetcode.LeetcodeDomain(disk_cache=False)

    def screen_all():
        leetcode._SCREENS.clear()
        return leetcode.screen(
            problems,
            excluded,
            profiles=screen.profiles,
            samples=screen.screen_samples,
            min_success=screen.min_success,
            timeout_s=screen.probe_timeout_s,
            workers=workers,
            disk_cache=False,
        )

    return {
        "arithmetic execute_many (200 x 20)": lambda: arith.execute_many(programs, inputs),
        "ciphers execute (20 x 10)": lambda: [
            cipher.execute(c, t) for c, t in zip(codes, texts, strict=True)
        ],
        f"leetcode screen ({len(problems)} kzleet solutions)": screen_all,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline-rev", default="ffde809", help="the git revision whose sandbox is the baseline")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="leetcode screening processes at once")
    args = p.parse_args()
    sandboxes = {"baseline": _baseline(args.baseline_rev), "strict": run_calls}
    work = _workloads(args.workers)
    times = {(name, s): [] for name in work for s in sandboxes}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in work.items():
            for label, sandbox_fn in sandboxes.items():
                for module in (arithmetic, ciphers, leetcode):
                    module.run_calls = sandbox_fn
                start = time.perf_counter()
                outputs[name, label] = fn()
                times[name, label].append(time.perf_counter() - start)
    for name in work:
        base, strict = (statistics.median(times[name, s]) for s in sandboxes)
        same = outputs[name, "baseline"] == outputs[name, "strict"]
        change = strict / base - 1
        print(f"{name:45s} baseline {base:6.2f}s  strict {strict:6.2f}s  {change:+6.1%}  same output: {same}")


if __name__ == "__main__":
    main()
