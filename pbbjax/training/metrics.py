"""Training metrics: model FLOPs and MFU, a JSONL + TensorBoard (+ wandb) logger, progress, a text table.

FLOPs convention (MaxText's ``calculate_tflops_training_per_device``): a matmul ``[m, k] @ [k, n]`` costs
``2 m k n``; a trained token costs 6 FLOPs per matmul weight (2 forward, 4 backward), counting q/k/v/o,
gate/up/down and the LM head (also when tied to the embedding), but not the embedding lookup, biases,
norms, RoPE, softmax or the loss. Attention adds ``QK^T`` and ``PV``: ``4 * layers * heads * head_dim *
seq_len`` per token forward, halved for the causal mask (the useful half of the square), times 3 for
training, i.e. ``12 * layers * heads * head_dim * seq_len / 2``, where ``seq_len`` is the length of the
(packed) training rows, as MaxText's ``max_target_length``. These are *model* FLOPs: rematerialised
recomputation and the masked half of the score matrix that the decoder still computes are not counted.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pbbjax.config.sections import WandbConfig
from pbbjax.core.tables import json_value
from pbbjax.models.architecture import ModelConfig
from pbbjax.training.tracking import start_wandb

# Dense bf16 peak FLOP/s of one chip, from the vendors' spec sheets. The H100/H200 figure is the SXM
# part's (an H100 PCIe peaks at 756e12: pass that as the override). CPUs have no entry: their peak is
# cores x clock x FLOPs per cycle (64 in fp32 with two AVX-512 FMA units), so a CPU run reports MFU as None
# unless the config's ``peak_flops_per_chip`` gives that figure; it overrides this table everywhere.
PEAK_FLOPS = {"tpu v4": 275e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6e": 918e12}
PEAK_FLOPS |= {"h100": 989e12, "h200": 989e12}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: attention and MLP projections, plus the LM head."""
    d, h = cfg.hidden_size, cfg.head_dim
    layer = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    return cfg.num_layers * layer + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward FLOPs of QK^T and PV per token; ``causal=False``: the full square, as the decoder runs it."""
    flops = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return flops / 2 if causal else flops


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Model FLOPs of one forward pass per token (one third of :func:`train_flops_per_token`)."""
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=causal)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Model FLOPs per trained token (forward + backward), MaxText's convention (see the module docstring)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, causal=causal)


def peak_flops_per_chip(device_kind: str | None = None, override: float | None = None) -> float | None:
    """``override`` if given, else :data:`PEAK_FLOPS` for ``device_kind`` (default jax's); None if unknown."""
    if override is not None:
        return float(override)
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower().replace(" lite", "e")  # jax says "TPU v5 lite" (v5e), "TPU v5" (v5p)
    kind = "tpu v5p" if kind == "tpu v5" else kind
    return next((peak for name, peak in PEAK_FLOPS.items() if name in kind), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_s: float | None, *, num_chips=1):
    """Model FLOP/s over ``num_chips * peak_flops_per_s`` (tokens_per_s of all those chips); None: no peak."""
    if not peak_flops_per_s:
        return None
    return tokens_per_s * flops_per_token / (peak_flops_per_s * num_chips)


def _primary(is_primary: bool | None) -> bool:
    if is_primary is not None:
        return is_primary
    import jax

    return jax.process_index() == 0


def _to_float(value: Any) -> float:
    """A number or one-element array as a float; float32/bf16 keep their short repr (1e-4, not 9.99e-05)."""
    x = np.asarray(value).reshape(())[()]
    if isinstance(x, np.generic) and x.dtype.kind not in "biu" and x.dtype.itemsize < 8:
        return float(str(x))
    return float(x)


_warned_no_tensorboard = False


class MetricsLogger:
    """Appends ``{"step": s, **metrics}`` lines to ``<workdir>/metrics.jsonl``; scalars to TensorBoard.

    The file is opened in append mode, so a resumed run continues it (steps between the last checkpoint
    and the interruption then appear twice; :func:`read_metrics` keeps every line). Values are plain
    floats; NaN/inf are the strings "nan"/"inf"/"-inf". TensorBoard event files (via ``tensorboardX``) go
    to ``<workdir>/tensorboard/``; without the package the logger warns once and writes JSONL only.
    With ``wandb`` settings (``tracking.WandbConfig``) the same values also go to a Weights & Biases run
    (``tracking.start_wandb``: named ``name``, default the workdir's name, with ``run_config`` as its
    config, resumed from the id in the workdir). Only the primary process (``jax.process_index() == 0``
    unless ``is_primary`` says) writes anything or starts a wandb run.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        is_primary: bool | None = None,
        tensorboard: bool = True,
        wandb: WandbConfig | None = None,
        run_config: dict | None = None,
        name: str | None = None,
    ):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = _primary(is_primary)
        self._file: TextIO | None = None
        self._writer = None
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            self._writer = _tensorboard_writer(Path(workdir) / "tensorboard")
        if wandb is not None:
            name = name or Path(workdir).resolve().name
            self._wandb = start_wandb(Path(workdir), wandb, run_config or {}, name)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        """One line for ``step``; keys become ``prefix/key`` when a prefix is given (e.g. "train")."""
        if self._file is None:
            return
        head = f"{prefix.rstrip('/')}/" if prefix else ""
        try:
            values = {head + k: _to_float(v) for k, v in metrics.items()}
        except (TypeError, ValueError) as e:
            raise TypeError(f"metrics must be numbers or single-element arrays: {metrics!r}") from e
        line = {"step": int(step), **{k: json_value(v) for k, v in values.items()}}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, int(step))
            self._writer.flush()
        if self._wandb is not None:  # steps a resumed run repeats (same values) are below wandb's: dropped
            self._wandb.log(values, step=int(step))

    def close(self, exit_code: int = 0) -> None:
        """Close the files; a wandb run ends with ``exit_code`` (nonzero: marked failed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


def _tensorboard_writer(logdir: Path):
    global _warned_no_tensorboard
    # tensorboardX's __init__ imports torch when installed: seconds, and torch's own CUDA/OpenMP libraries
    # in a JAX process, only to accept torch tensors. Hide torch for the import unless it is already loaded.
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter

        logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)  # "NaN found" on each NaN logged
        return SummaryWriter(logdir=str(logdir), flush_secs=30)
    except Exception as e:  # missing package, or a protobuf it cannot work with: keep training
        if not _warned_no_tensorboard:
            _warned_no_tensorboard = True
            warnings.warn(f"TensorBoard is off ({e!r}): metrics go to metrics.jsonl only", stacklevel=3)
        return None
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def read_metrics(workdir: str | Path) -> list[dict[str, float]]:
    """The lines of ``<workdir>/metrics.jsonl`` as dicts, "nan"/"inf" strings turned back into floats."""
    path = Path(workdir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{k: float(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]


def format_duration(seconds: float) -> str:
    """45s, 3m10s, 2h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A stage's progress on the primary process: a tqdm bar on a TTY, else a plain line every ``interval_s``.

    ``update(step, ...)`` takes the absolute step. The plain lines (for CI and log files) read like
    ``stage1 step 120/400 loss 0.532 tok/s 412 lr 1.0e-04 eta 3m10s``; ``close()`` prints a last one.
    """

    def __init__(
        self,
        stage_name: str,
        total_steps: int | None,
        initial: int = 0,
        *,
        is_primary: bool | None = None,
        stream: TextIO | None = None,
        interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.initial, self.step = stage_name, total_steps, initial, initial
        self.enabled = _primary(is_primary)
        self.stream = stream if stream is not None else sys.stdout  # resolved now, so capsys/redirects apply
        self.interval_s, self.clock = interval_s, clock
        self.start = self._last_print = clock()
        self._fields: dict[str, float] = {}
        self._shown: int | None = None
        self._bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, desc=stage_name, file=self.stream)

    def update(self, step: int, *, loss=None, tokens_per_s=None, lr=None, **extra) -> None:
        """Move to the absolute ``step``; the values given replace the ones shown (numbers or 0-d arrays);
        ``extra`` values (e.g. ``reward``) are shown under their own names."""
        if not self.enabled:
            return
        fields = {"loss": loss, **extra, "tok/s": tokens_per_s, "lr": lr}
        self._fields.update({k: _to_float(v) for k, v in fields.items() if v is not None})
        self.step = step
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(k, v) for k, v in self._fields.items()}, refresh=False)
            self._bar.update(step - self._bar.n)
        elif self._shown is None or step == self.total or self.clock() - self._last_print >= self.interval_s:
            self._print_line()

    def _print_line(self) -> None:
        now = self.clock()
        total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.stage} step {self.step}{total}"]
        parts += [f"{k} {_fmt(k, v)}" for k, v in self._fields.items()]
        done, elapsed = self.step - self.initial, now - self.start
        if self.total is not None and self.step < self.total and done > 0:
            parts.append(f"eta {format_duration(elapsed / done * (self.total - self.step))}")
        elif self.total is not None and self.step >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        print(" ".join(parts), file=self.stream, flush=True)
        self._last_print, self._shown = now, self.step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._shown != self.step:
            self._print_line()
        self.enabled = False


def _fmt(key: str, value: float) -> str:
    return f"{value:.1e}" if key == "lr" else f"{value:,.0f}" if key == "tok/s" else f"{value:.4g}"
