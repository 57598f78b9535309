"""Plots of evaluation records, in the forms of the paper's figures (matplotlib, Agg backend, PNG files).

- ``accuracy_by_stage``: accuracy after each stage, per (set, mode), with 95% CI bars and the values written
  over them (Fig. 3 lower left);
- ``accuracy_by_<key>``: accuracy per program length / cipher shift after each stage (Fig. 3 upper left,
  Fig. 5);
- ``accuracy_over_steps``: accuracy through training, where stages were evaluated every N steps (Fig. 3
  upper right: retroactive stage 2, SFT vs RL);
- ``exchange_rate``: AD(N) accuracy against N with the PBB line and the exchange rate N* where AD(N)
  reaches PBB (Fig. 2).

Each function takes records (dicts from ``evaluation.evaluate`` with ``after``/``step``) and a path, and
returns the path; ``write_plots`` draws every plot the records support. Every accuracy plot marks each
set's guessing floor (a record's ``floor``, where it has one): a black tick over each bar, or a dotted line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _ordered(values):
    return list(dict.fromkeys(values))


def _err(r) -> tuple[float, float]:
    """(lower, upper) error-bar lengths from a record's CI, 0 where it has none."""
    acc, lo, hi = r.get("accuracy"), r.get("ci_low"), r.get("ci_high")
    if acc is None or lo is None or hi is None or math.isnan(lo):
        return 0.0, 0.0
    return max(acc - lo, 0.0), max(hi - acc, 0.0)


def _floor_lines(ax, records: list[dict]) -> None:
    """A dotted horizontal line at each set's guessing floor (the first record of the set that has one)."""
    floors = {}
    for r in records:
        if r.get("floor") is not None:
            floors.setdefault(r["set"], r["floor"])
    for i, (name, floor) in enumerate(floors.items()):
        ax.axhline(floor, color="k", ls=":", lw=1 + 0.5 * i, label=f"guessing floor: {name} ({floor:.2f})")


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finish(fig, ax, path, title: str, xlabel: str | None = None, legend_size: int = 8) -> Path:
    """The accuracy axis ([0, 1]), labels, title and legend every accuracy plot shares; saves ``fig``."""
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    return _save(fig, path)


def plot_by_stage(records: list[dict], path, title: str = "", measure: str = "accuracy") -> Path:
    """Bars of ``measure`` after each stage (or per arm), one series per (set, mode), with CI bars
    (``ci_low``/``ci_high``; for another measure, ``<measure>_ci_low``/``_high``)."""
    if measure != "accuracy":
        records = [
            {
                **r,
                "accuracy": r[measure],
                "ci_low": r.get(f"{measure}_ci_low"),
                "ci_high": r.get(f"{measure}_ci_high"),
                "floor": None,  # the guessing floor is an accuracy
            }
            for r in records
            if r.get(measure) is not None
        ]
    finals = [r for r in records if r.get("final", True) and r.get("accuracy") is not None]
    stages = _ordered(r["after"] for r in finals)
    series = _ordered((r["set"], r["mode"]) for r in finals)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(stages), 3.6))
    width = 0.8 / max(len(series), 1)
    floor_label = "guessing floor"
    for j, (name, mode) in enumerate(series):
        rs = {r["after"]: r for r in finals if (r["set"], r["mode"]) == (name, mode)}
        xs = [i + (j - (len(series) - 1) / 2) * width for i, s in enumerate(stages) if s in rs]
        ys = [rs[s]["accuracy"] for s in stages if s in rs]
        err = list(zip(*(_err(rs[s]) for s in stages if s in rs), strict=True))
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=f"{name} ({mode})")
        for x, y, up in zip(xs, ys, err[1] if err else [], strict=True):  # the value over its error bar
            ax.text(x, y + up + 0.02, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        for x, s in zip(xs, (s for s in stages if s in rs), strict=True):
            if (floor := rs[s].get("floor")) is not None:  # a tick over the bar at its set's floor
                ax.plot([x - width / 2, x + width / 2], [floor, floor], color="k", lw=2, label=floor_label)
                floor_label = None
    ax.set_xticks(
        range(len(stages)),
        stages,
        rotation=30 if len(stages) > 5 else 0,
        ha="right" if len(stages) > 5 else "center",
    )
    if measure == "accuracy":
        ax.set_ylim(0, 1)
    ax.set_ylabel(measure)
    ax.set_title(title or f"{measure} after each stage")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_breakdown(records: list[dict], key: str, path, title: str = "") -> Path:
    """Accuracy per value of ``key`` (``by_<key>`` in the records), one line per (stage, set, mode)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in records:
        table = r.get(f"by_{key}")
        if not table or not r.get("final", True):
            continue
        xs = sorted(table, key=lambda v: float(v) if re.fullmatch(r"-?\d+(\.\d+)?", v) else math.inf)
        ys = [table[x]["accuracy"] for x in xs]
        err = list(zip(*(_err(table[x]) for x in xs), strict=True))
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=f"{r['after']}: {r['set']} ({r['mode']})")
    _floor_lines(ax, [r for r in records if r.get(f"by_{key}") and r.get("final", True)])
    if len(ax.get_xticks()) > 12:  # e.g. the 25 cipher shifts: labels side by side would run together
        ax.tick_params(axis="x", labelsize=7, labelrotation=90)
    return _finish(fig, ax, path, title or f"accuracy by {key}", key, legend_size=7)


def plot_over_steps(records: list[dict], path, title: str = "") -> Path:
    """Accuracy against the global step, per (set, mode), with the stage boundaries marked."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    rs = sorted((r for r in records if r.get("accuracy") is not None), key=lambda r: r["step"])
    for name, mode in _ordered((r["set"], r["mode"]) for r in rs):
        pts = [r for r in rs if (r["set"], r["mode"]) == (name, mode)]
        lo = [r["accuracy"] - _err(r)[0] for r in pts]
        hi = [r["accuracy"] + _err(r)[1] for r in pts]
        steps = [r["step"] for r in pts]
        ax.plot(steps, [r["accuracy"] for r in pts], marker=".", label=f"{name} ({mode})")
        ax.fill_between(steps, lo, hi, alpha=0.2)
    for r in rs:
        if r.get("final"):
            ax.axvline(r["step"], color="grey", lw=0.5, ls=":")
    _floor_lines(ax, rs)
    return _finish(fig, ax, path, title or "accuracy through training", "step")


def exchange_rate(ns, accuracies, target: float) -> float | None:
    """The N at which the AD(N) curve first reaches ``target``, interpolating linearly in log N between the
    measured N; ``ns[0]`` if AD(ns[0]) already reaches it; None if no measured N does."""
    pairs = sorted(zip(ns, accuracies, strict=True))
    for i, (n, acc) in enumerate(pairs):
        if acc >= target:
            if i == 0:
                return float(n)
            n0, a0 = pairs[i - 1]
            frac = (target - a0) / (acc - a0)
            return float(math.exp(math.log(n0) + frac * (math.log(n) - math.log(n0))))
    return None


def ad_curve(records: list[dict], set_name: str = "eval") -> list[tuple[int, dict]]:
    """[(N, record)] of the final ``set_name`` records after the AD stages ``ad<N>``, sorted by N."""
    out = []
    for r in records:
        m = re.fullmatch(r"ad(\d+)", r["after"])
        if m and r.get("final", True) and r["set"] == set_name and r.get("accuracy") is not None:
            out.append((int(m.group(1)), r))
    return sorted(out, key=lambda x: x[0])


def plot_exchange_rate(
    curve: list[tuple[int, dict]], path, pbb: dict | None = None, title: str = "", star_ci=None
) -> Path:
    """AD(N) accuracy (with its CI band) against N on a log axis; with ``pbb`` (a record), its accuracy and
    CI as a horizontal band and N* marked; ``star_ci`` = (low, high) shades N*'s interval (an infinite
    end is drawn to the plot's edge)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ns = [n for n, _ in curve]
    accs = [r["accuracy"] for _, r in curve]
    ax.plot(ns, accs, marker="o", label="AD(N)")
    ax.fill_between(
        ns,
        [a - _err(r)[0] for a, (_, r) in zip(accs, curve, strict=True)],
        [a + _err(r)[1] for a, (_, r) in zip(accs, curve, strict=True)],
        alpha=0.2,
    )
    if pbb is not None:
        ax.axhline(pbb["accuracy"], color="C3", label="PBB (one instruction)")
        if pbb.get("ci_low") is not None:
            ax.axhspan(pbb["ci_low"], pbb["ci_high"], color="C3", alpha=0.15)
        star = exchange_rate(ns, accs, pbb["accuracy"])
        if star is not None:
            ax.axvline(star, color="C3", ls="--", lw=1, label=f"N* = {star:.3g}")
        if star_ci is not None:
            lo, hi = star_ci
            hi = hi if math.isfinite(hi) else max(ns) * 10
            ax.axvspan(lo, hi, color="C3", alpha=0.08, label=f"N* 95% CI [{lo:.3g}, {star_ci[1]:.3g}]")
    _floor_lines(ax, [r for _, r in curve])
    ax.set_xscale("log")
    return _finish(
        fig, ax, path, title or "exchange rate: AD(N) vs PBB", "N (execution examples per eval instruction)"
    )


def write_plots(records: list[dict], outdir, title: str = "", pbb: dict | None = None) -> list[Path]:
    """Every plot the records support, into ``outdir``; returns their paths. The exchange-rate plot's PBB
    line is ``pbb``, else the final eval record after an ``ad`` run's ``pbb`` stage."""
    outdir = Path(outdir)
    scored = [r for r in records if r.get("accuracy") is not None]
    if not scored:
        return []
    paths = [plot_by_stage(scored, outdir / "accuracy_by_stage.png", title)]
    keys = sorted({k[3:] for r in scored for k in r if k.startswith("by_") and k != "by_instruction"})
    paths += [plot_breakdown(scored, k, outdir / f"accuracy_by_{k}.png", title) for k in keys]
    if any(not r.get("final", True) for r in scored):
        paths.append(plot_over_steps(scored, outdir / "accuracy_over_steps.png", title))
    curve = ad_curve(scored)
    if len(curve) >= 2:
        pbb = pbb or next(
            (r for r in scored if r["after"] == "pbb" and r.get("final", True) and r["set"] == "eval"), None
        )
        paths.append(plot_exchange_rate(curve, outdir / "exchange_rate.png", pbb, title))
    return paths
