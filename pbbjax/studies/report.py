"""A study's comparison: its arms' evaluation records aggregated over seeds, as JSON, a table and plots.

Each arm's row per (set, mode) holds the per-seed accuracies, their mean and a 95% interval. With two or
more seeds and per-instruction results, the interval is a bootstrap over (seed, instruction) clusters:
every seed's instructions are its own units, resampled with replacement and pooled by their rows
(``ci: "clusters"``); seeds that happen to agree do not give it zero width, as a t-interval over seed
means would. Without per-instruction results it is that Student-t interval (``ci: "seeds"``); with one
seed, the run's own bootstrap over instructions (``ci: "instructions"``). Other numeric measures
(held-out loss, CoT recall, grammar diversity and random baseline) are averaged over seeds.

A study with a ``reference`` arm also reports each other arm's difference from it (reference minus arm)
on every (set, mode) they share, with a paired bootstrap over the (seed, instruction) clusters that both
evaluated: one resample draws the same clusters for both arms, so what the arms share (the seed's
instructions and held-out inputs) cancels.

The exchange rate N* (the N at which AD(N) reaches PBB from one instruction, interpolated in log N) is
estimated from the seed-mean curves; its interval is a two-level bootstrap: seeds with replacement, then
within each seed its eval instructions with replacement (the same draw for every arm of that seed, as the
arms share instructions). A resample where AD(N) never reaches PBB counts as N* above the largest N, so an
upper end of ``inf`` means "beyond the measured range".
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from pbbjax.core.tables import json_value
from pbbjax.eval.plots import (
    exchange_rate,
    plot_breakdown,
    plot_by_stage,
    plot_exchange_rate,
    plot_over_steps,
)

# (eval_executions: the examples per eval instruction an AD(N) arm really trained on, its real N)
EXTRA_MEASURES = ("loss", "recall", "diversity", "random_baseline", "eval_executions")
# measures finer than accuracy, with a t-interval over seeds like accuracy's (within these bounds)
SEED_INTERVALS = {"loss": (0.0, math.inf), "recall": (0.0, 1.0)}


def seed_interval(values: list[float], confidence: float = 0.95, bounds=(0.0, 1.0)) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed values, clipped to ``bounds`` (accuracies: [0, 1])."""
    k = len(values)
    mean = float(np.mean(values))
    if k < 2:
        return mean, mean
    half = stats.t.ppf(0.5 + confidence / 2, k - 1) * float(np.std(values, ddof=1)) / math.sqrt(k)
    return max(bounds[0], mean - half), min(bounds[1], mean + half)


def arm_finals(arm, records: list[dict]) -> list[dict]:
    return [r for r in records if r["after"] == arm.after and r.get("final", True)]


def aggregate(arms, runs: dict, seeds: int) -> list[dict]:
    """One row per (arm, set, mode) over ``runs[(run name, seed)]`` (each a list of records)."""
    rows = []
    for arm in arms:
        per_key = defaultdict(list)
        for seed in range(seeds):
            for r in arm_finals(arm, runs[(arm.run, seed)]):
                per_key[(r["set"], r["mode"])].append(r)
        for (set_name, mode), recs in per_key.items():
            accs = [r["accuracy"] for r in recs if r.get("accuracy") is not None]
            row = {"arm": arm.name, "run": arm.run, "after": arm.after, "set": set_name, "mode": mode}
            row |= {"group": recs[0].get("group"), "seeds": len(recs), "n": recs[0].get("n")}
            if accs:
                row["accuracy"] = float(np.mean(accs))
                row["per_seed"] = accs
                clusters = _clusters(recs)
                if len(accs) >= 2 and clusters is not None:
                    row["ci_low"], row["ci_high"] = cluster_interval(clusters)
                    row["ci"] = "clusters"
                elif len(accs) >= 2:
                    row["ci_low"], row["ci_high"] = seed_interval(accs)
                    row["ci"] = "seeds"
                else:
                    row["ci_low"], row["ci_high"] = recs[0].get("ci_low"), recs[0].get("ci_high")
                    row["ci"] = "instructions"
            if floors := [r["floor"] for r in recs if r.get("floor") is not None]:
                row["floor"] = float(np.mean(floors))  # the guessing floor, mean over seeds
            for m in EXTRA_MEASURES:
                values = [r[m] for r in recs if isinstance(r.get(m), float)]
                if values:
                    row[m] = float(np.mean(values))
                if m in SEED_INTERVALS and len(values) >= 2:
                    row[f"{m}_ci_low"], row[f"{m}_ci_high"] = seed_interval(values, bounds=SEED_INTERVALS[m])
                    row[f"{m}_per_seed"] = values
            for key in {k for r in recs for k in r if k.startswith("by_") and k != "by_instruction"}:
                row[key] = _breakdown([r[key] for r in recs if key in r])
            rows.append(row)
    return rows


def _breakdown(tables: list[dict]) -> dict:
    """Per-value accuracy over seeds: mean and interval (over seeds, or the single run's own)."""
    out = {}
    for value in sorted({v for t in tables for v in t}, key=str):
        cells = [t[value] for t in tables if value in t]
        accs = [c["accuracy"] for c in cells]
        lo, hi = seed_interval(accs) if len(accs) >= 2 else (cells[0].get("ci_low"), cells[0].get("ci_high"))
        out[value] = {"n": cells[0]["n"], "accuracy": float(np.mean(accs)), "ci_low": lo, "ci_high": hi}
    return out


# -- (seed, instruction) clusters ---------------------------------------------------------------------------


def _clusters(recs: list[dict]) -> dict[tuple[int, str], tuple[int, float]] | None:
    """{(seed index, instruction): (rows, accuracy)} of one arm's records (one per seed), or None where a
    record lacks per-instruction results."""
    if not recs or any(not r.get("by_instruction") for r in recs):
        return None
    return {(k, i): tuple(v) for k, r in enumerate(recs) for i, v in r["by_instruction"].items()}


def _resampled_means(tables: list[dict], keys: list, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, len(tables)]: each table's row-weighted accuracy over the same resamples of ``keys``."""
    n = np.array([[t[k][0] for k in keys] for t in tables], dtype=float)
    hits = np.array([[t[k][0] * t[k][1] for k in keys] for t in tables], dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(keys), (n_boot, len(keys)))
    return hits[:, picks].sum(-1).T / n[:, picks].sum(-1).T


def cluster_interval(table: dict, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the pooled accuracy of one arm's (seed, instruction) clusters."""
    draws = _resampled_means([table], sorted(table), n_boot, seed)[:, 0]
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return float(lo), float(hi)


def differences(reference: str, arms, runs: dict, seeds: int, n_boot=2000, seed=0) -> list[dict]:
    """Reference arm minus each other arm, per (set, mode) both evaluated, over the (seed, instruction)
    clusters both have: the pooled difference and its paired 95% bootstrap interval."""
    finals = {}  # (arm, set, mode) -> records, one per seed
    for arm in arms:
        for s in range(seeds):
            for r in arm_finals(arm, runs[(arm.run, s)]):
                finals.setdefault((arm.name, r["set"], r["mode"]), []).append(r)
    out = []
    for (name, set_name, mode), recs in finals.items():
        ref = finals.get((reference, set_name, mode))
        if name == reference or ref is None or len(ref) != len(recs):
            continue
        a, b = _clusters(ref), _clusters(recs)
        if a is None or b is None or not (keys := sorted(set(a) & set(b))):
            continue
        point = [sum(t[k][0] * t[k][1] for k in keys) / sum(t[k][0] for k in keys) for t in (a, b)]
        draws = _resampled_means([a, b], keys, n_boot, seed)
        diff = draws[:, 0] - draws[:, 1]
        lo, hi = np.quantile(diff, [0.025, 0.975])
        out.append(
            {
                "arm": reference,
                "minus": name,
                "set": set_name,
                "mode": mode,
                "difference": float(point[0] - point[1]),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "clusters": len(keys),
                "seeds": len(recs),
            }
        )
    return out


def differences_table(rows: list[dict]) -> str:
    head = "| difference | set | mode | seeds | clusters | value | ci95 |\n|---|---|---|---|---|---|---|"
    lines = [
        f"| {d['arm']} - {d['minus']} | {d['set']} | {d['mode']} | {d['seeds']} | {d['clusters']} | "
        f"{d['difference']:+.3f} | [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] |"
        for d in rows
    ]
    return "\n".join([head, *lines])


# -- the exchange rate --------------------------------------------------------------------------------------


def _instruction_table(arm, records) -> dict[str, tuple[int, float]] | None:
    recs = [r for r in arm_finals(arm, records) if r["set"] == "eval" and r.get("by_instruction")]
    return {i: tuple(v) for i, v in recs[0]["by_instruction"].items()} if recs else None


def _pooled(tables: list[dict], draws: list[list[str]]) -> float:
    num = den = 0.0
    for table, ids in zip(tables, draws, strict=True):
        for i in ids:
            n, acc = table[i]
            num, den = num + n * acc, den + n
    return num / den if den else float("nan")


def _real_n(nominal: int, arm, runs: dict, seeds: int) -> float:
    """The examples per eval instruction that AD(N) trained on, as its records say (``eval_executions``,
    the same for every seed unless a domain ran short of inputs: then their mean); else the nominal N."""
    real = [r.get("eval_executions") for s in range(seeds) for r in arm_finals(arm, runs[(arm.run, s)])]
    real = [n for n in real if isinstance(n, int | float)]
    return float(np.mean(real)) if real else float(nominal)


def exchange_rate_estimate(arms, runs: dict, seeds: int, n_boot: int = 2000, seed: int = 0) -> dict | None:
    """N* from the seed-mean AD(N) curve and PBB, with its two-level bootstrap interval."""
    ad = sorted((int(a.after[2:]), a) for a in arms if a.after.startswith("ad") and a.after[2:].isdigit())
    pbb = next((a for a in arms if a.after == "pbb"), None)
    if pbb is None or len(ad) < 2:
        return None
    ad = [(_real_n(n, a, runs, seeds), a) for n, a in ad]
    tables = {}  # (arm name, seed) -> {instruction: (n, accuracy)}
    for arm in [pbb] + [a for _, a in ad]:
        for s in range(seeds):
            table = _instruction_table(arm, runs[(arm.run, s)])
            if table is None:
                return None
            tables[(arm.name, s)] = table
    ns = [n for n, _ in ad]

    def star(seed_draw, ins_draws) -> tuple[float | None, list[float], float]:
        curve = [
            _pooled([tables[(a.name, s)] for s in seed_draw], [ins_draws[s] for s in seed_draw])
            for _, a in ad
        ]
        target = _pooled([tables[(pbb.name, s)] for s in seed_draw], [ins_draws[s] for s in seed_draw])
        return exchange_rate(ns, curve, target), curve, target

    ids = {s: sorted(tables[(pbb.name, s)]) for s in range(seeds)}
    point, curve, target = star(list(range(seeds)), ids)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        seed_draw = [int(x) for x in rng.integers(0, seeds, seeds)]
        ins = {s: [ids[s][j] for j in rng.integers(0, len(ids[s]), len(ids[s]))] for s in set(seed_draw)}
        value = star(seed_draw, ins)[0]
        draws.append(math.inf if value is None else value)
    # order statistics, not interpolation: an end may be infinite (not reached in that resample)
    lo, hi = (float(x) for x in np.quantile(draws, [0.025, 0.975], method="inverted_cdf"))
    return {
        "n_star": point,
        "ci_low": lo,
        "ci_high": hi,
        "ns": ns,
        "ad_accuracy": curve,
        "pbb_accuracy": target,
        "reached_in": float(np.mean([d != math.inf for d in draws])),
        "n_boot": n_boot,
    }


# -- outputs ------------------------------------------------------------------------------------------------


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(rows: list[dict], measures=("accuracy",)) -> str:
    extra = [m for m in EXTRA_MEASURES if m in measures or (m == "loss" and any("loss" in r for r in rows))]
    names = {"loss": "answer loss [95% CI]", "recall": "recall [95% CI]"}
    head = ["arm", "set", "mode", "seeds", "n", "accuracy", "95% CI", "CI over", "per seed", "guessing floor"]
    head += [names.get(m, m) for m in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = f"[{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]" if r.get("ci_low") is not None else "-"
        per_seed = " ".join(f"{a:.2f}" for a in r.get("per_seed", []))
        cells = [r["arm"], r["set"], r["mode"], r["seeds"], r["n"], _fmt(r.get("accuracy")), ci]
        cells += [r.get("ci", "-"), per_seed or "-", _fmt(r.get("floor"))]
        cells += [_measure(r, m) for m in extra]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def _measure(row: dict, m: str) -> str:
    if row.get(f"{m}_ci_low") is None:
        return _fmt(row.get(m))
    return f"{_fmt(row.get(m))} [{_fmt(row[f'{m}_ci_low'])}, {_fmt(row[f'{m}_ci_high'])}]"


def _as_records(rows: list[dict]) -> list[dict]:
    """Aggregated rows in the shape ``pbbjax.eval.plots`` draws: the arm in place of the stage."""
    return [{**r, "after": r["arm"], "final": True} for r in rows if r.get("accuracy") is not None]


def _over_steps(arms, runs, seeds) -> list[dict]:
    """Seed-mean accuracy of each arm's stage at every evaluated step (records during and at its end)."""
    points = defaultdict(list)
    for arm in arms:
        for s in range(seeds):
            for r in runs[(arm.run, s)]:
                if r["after"] == arm.after and r.get("accuracy") is not None:
                    points[(arm.name, r["set"], r["mode"], r["step"])].append(r["accuracy"])
    out = []
    for (arm, set_name, mode, step), accs in sorted(points.items(), key=lambda kv: kv[0][3]):
        lo, hi = seed_interval(accs)
        rec = {"set": f"{arm}: {set_name}", "mode": mode, "step": step, "accuracy": float(np.mean(accs))}
        out.append(rec | {"ci_low": lo, "ci_high": hi, "final": False})
    return out


def write_study_plots(study, arms, rows, runs, seeds, xr, outdir: Path) -> list[Path]:
    title = f"{study.name} ({study.figure})"
    records = _as_records(rows)
    paths = []
    if "arms" in study.plots and records:
        paths.append(plot_by_stage(records, outdir / "arms.png", title))
        for m in EXTRA_MEASURES:
            if (m in study.metrics or m == "loss") and any(m in r for r in records):
                paths.append(plot_by_stage(records, outdir / f"arms_{m}.png", f"{title}: {m}", measure=m))
    for key in ("length", "shift"):
        if f"by_{key}" in study.plots:
            paths.append(plot_breakdown(records, key, outdir / f"accuracy_by_{key}.png", title))
    if "over_steps" in study.plots:
        steps = _over_steps([a for a in arms if a.after != "stage1"], runs, seeds)
        if steps:
            paths.append(plot_over_steps(steps, outdir / "accuracy_over_steps.png", title))
    if "exchange_rate" in study.plots and xr is not None:
        curve = [
            (r.get("eval_executions", n), r)
            for r in records
            if r["set"] == "eval"
            for n in [_ad_n(r["arm"])]
            if n is not None
        ]
        pbb = next((r for r in records if r["arm"] == "pbb" and r["set"] == "eval"), None)
        paths.append(
            plot_exchange_rate(
                sorted(curve, key=lambda c: c[0]),
                outdir / "exchange_rate.png",
                pbb,
                title,
                (xr["ci_low"], xr["ci_high"]),
            )
        )
    return paths


def _ad_n(arm: str) -> int | None:
    return int(arm[2:]) if arm.startswith("ad") and arm[2:].isdigit() else None


def report(study, arms, runs: dict, seeds: int, preset: str, out: Path, first_seed: int = 0) -> dict:
    """Aggregate, then write results.json, table.md and plots/ into ``out``; print the table."""
    out = Path(out)
    rows = aggregate(arms, runs, seeds)
    xr = exchange_rate_estimate(arms, runs, seeds) if "exchange_rate" in study.plots else None
    data = {
        "study": study.name,
        "finding": study.finding,
        "figure": study.figure,
        "preset": preset,
        "seeds": seeds,
        **({"first_seed": first_seed} if first_seed else {}),  # seeds first_seed..first_seed + seeds - 1
        "arms": rows,
    }
    if study.reference:
        data["differences"] = differences(study.reference, arms, runs, seeds)
    if xr is not None:
        stage1 = {a.name for a in arms if a.after == "stage1"}
        base = [r["accuracy"] for r in rows if r["arm"] in stage1 and r["set"] == "eval"]
        xr["stage1_accuracy"] = base[0] if base else None  # what PBB adds to, from the same stage-1 model
        data["exchange_rate"] = xr
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_strict_json(data), indent=2, allow_nan=False))
    table = markdown_table(rows, study.metrics)
    if data.get("differences"):
        table += "\n\nDifferences (paired bootstrap over (seed, instruction) clusters):\n\n"
        table += differences_table(data["differences"])
    if xr is not None:
        star = "not reached" if xr["n_star"] is None else f"{xr['n_star']:.3g}"
        if xr["n_star"] is not None and xr["ad_accuracy"][0] >= xr["pbb_accuracy"]:
            star = f"<= {xr['ns'][0]} (AD({xr['ns'][0]}) already reaches PBB)"
        table += (
            f"\n\nExchange rate N* = {star}, 95% CI [{xr['ci_low']:.3g}, {xr['ci_high']:.3g}] "
            f"(AD(N) reaches PBB in {xr['reached_in']:.0%} of {xr['n_boot']} bootstrap resamples)"
        )
        if xr["stage1_accuracy"] is not None and xr["pbb_accuracy"] <= xr["stage1_accuracy"]:
            table += (
                f"\n\nCaution: PBB ({xr['pbb_accuracy']:.3f}) is no better than stage 1 alone "
                f"({xr['stage1_accuracy']:.3f}), so N* measures no learning from the instruction: AD(N) only "
                "has to match the stage-1 model."
            )
    (out / "table.md").write_text(table + "\n")
    paths = write_study_plots(study, arms, rows, runs, seeds, xr, out / "plots")
    which = f"seeds {first_seed}-{first_seed + seeds - 1}" if first_seed else f"{seeds} seed(s)"
    print(f"\n{study.name} ({study.figure}), preset {preset}, {which}: {out}\n{table}")
    for p in paths:
        print(f"plot: {p}")
    return data


def _strict_json(value):
    """JSON has no inf or NaN (an unreached N* bound, a loss interval's open end): floats go through
    ``core.tables.json_value``, as in ``metrics.jsonl``."""
    if isinstance(value, float):
        return json_value(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value
