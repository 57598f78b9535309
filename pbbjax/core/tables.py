"""Results as text: fixed-width tables, and numbers as JSON can hold them."""

from __future__ import annotations

import math
from numbers import Number
from typing import Any

import numpy as np


def json_value(value: float) -> float | str:
    # JSON has no NaN/inf: they are written as the strings "nan", "inf", "-inf" (float() reads them back).
    return value if math.isfinite(value) else str(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | np.floating) and math.isfinite(value):
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e6 else f"{value:.3e}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A fixed-width text table: a header, a rule, one line per row; numbers right-aligned.

    Floats get 4 decimals (scientific notation outside [1e-3, 1e6)); None is "-"; a missing key is blank.
    """
    cells = [[_cell(row[c]) if c in row else "" for c in columns] for row in rows]
    numeric = [bool(rows) and all(isinstance(r.get(c), Number | None) for r in rows) for c in columns]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def join(values: list[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    lines = [join(list(columns)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [join(line) for line in cells])
