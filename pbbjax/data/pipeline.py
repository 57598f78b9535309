"""The grain pipeline from stage rows to training batches.

rows --tokenize (chat template, loss mask)--> examples --seeded shuffle, epochs--> pack to ``seq_len``
(first fit; segment and position ids) or pad --> global batches of ``batch_size`` --> this host's rows.

Every host builds the same global batches and keeps its own contiguous ``batch_size / hosts`` rows of each
(the rows ``jax.make_array_from_process_local_data`` expects from it). So the global batch, the number of
batches and the iterator's state do not depend on how many hosts there are: a run on a pod trains on the
same batches as on one host, every host stops after the same number of batches (no host waits in a
collective that another never joins), and one saved iterator state resumes every host. Packing the whole
stage on every host is cheap next to training on it (stages are at most a few hundred thousand rows).

A batch is a dict of int32 arrays ``[local_batch, seq_len]``: ``tokens``, ``loss_mask`` (1 where the token
is a completion token the model must predict from the previous position), ``segment_ids`` (1, 2, ... per
packed sequence; 0 = padding) and ``positions`` (restarting at 0 in each segment). The last batch of an
epoch is filled up with empty rows (all zeros), so no example is dropped. The iterator's state
(``get_state``/``set_state``) is small and JSON-able, and is saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np
from grain import experimental as grain_exp

from pbbjax.data.formatting import Row, end_of_turn_id, tokenize_row

FEATURES = ("tokens", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seq_len: int = 512
    batch_size: int = 8  # global, in sequences (rows of seq_len tokens), over all hosts
    pack: bool = True  # pack several examples per row (else one example per row, padded)
    num_packing_bins: int = 32  # first-fit packing window: more bins, less padding
    num_epochs: int | None = 1  # None repeats forever (the trainer then counts steps)
    seed: int = 0


class ExampleTooLongError(ValueError):
    """An example does not fit in ``seq_len``; it would lose its completion if truncated."""


def tokenize_rows(rows: list[Row], tokenizer, seq_len: int | None = None) -> list[dict[str, np.ndarray]]:
    """Rows -> {"tokens", "loss_mask"} int32 arrays; an example longer than ``seq_len`` is an error."""
    eot = end_of_turn_id(tokenizer)
    out = []
    for i, row in enumerate(rows):
        ids, mask = tokenize_row(tokenizer, row.prompt, row.completion, eot)
        if seq_len is not None and len(ids) > seq_len:
            raise ExampleTooLongError(
                f"stage {row.stage!r} row {i} ({row.kind}, {row.instruction_id}) has {len(ids)} tokens, "
                f"more than seq_len={seq_len}; raise pipeline.seq_len or shorten the instructions"
            )
        out.append({"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)})
    return out


def _pad_example(ex: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    n = len(ex["tokens"])
    out = {k: np.zeros(seq_len, np.int32) for k in FEATURES}
    out["tokens"][:n], out["loss_mask"][:n] = ex["tokens"], ex["loss_mask"]
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    return out


def _from_packed(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": ex["tokens"],
        "loss_mask": ex["loss_mask"],
        "segment_ids": ex["tokens_segment_ids"].astype(np.int32),
        "positions": ex["tokens_positions"].astype(np.int32),
    }


def _fill_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    n = batch["tokens"].shape[0]
    if n == size:
        return batch
    return {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def host_batch_size(cfg: PipelineConfig, process_count: int) -> int:
    if cfg.batch_size % process_count:
        raise ValueError(f"pipeline.batch_size={cfg.batch_size} is not divisible by {process_count} hosts")
    return cfg.batch_size // process_count


def make_dataset(
    examples: list[dict[str, np.ndarray]],
    cfg: PipelineConfig,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """This host's rows of the global batches of the tokenized ``examples``: iterate it, or checkpoint its
    iterator (the same state on every host)."""
    if not examples:
        raise ValueError("the stage has no examples")
    local_batch = host_batch_size(cfg, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process index {process_index} is not in [0, {process_count})")
    ds = grain.MapDataset.source(examples).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)  # reshuffles
    if cfg.pack:
        lengths = {"tokens": cfg.seq_len, "loss_mask": cfg.seq_len}
        packed = grain_exp.FirstFitPackIterDataset(
            ds.to_iter_dataset(),
            length_struct=lengths,
            num_packing_bins=cfg.num_packing_bins,
            seed=cfg.seed,
            shuffle_bins=True,
        )
        rows = packed.map(_from_packed)
    else:
        rows = ds.map(lambda ex: _pad_example(ex, cfg.seq_len)).to_iter_dataset()
    start = process_index * local_batch
    return (
        rows.batch(cfg.batch_size, drop_remainder=False)
        .map(lambda b: _fill_batch(b, cfg.batch_size))
        .map(lambda b: {k: v[start : start + local_batch] for k, v in b.items()})
    )
