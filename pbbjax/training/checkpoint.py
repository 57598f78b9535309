"""Training checkpoints on Orbax's ``CheckpointManager``: sharded state, JSON meta, a run fingerprint.

Each step is one directory ``DIR/<step>/`` with three Orbax items:

- ``state``: the pytree of (possibly sharded) ``jax.Array``s, written collectively by every process (OCDBT);
- ``meta``: the caller's JSON dict (stage, step within stage, data-iterator state ...);
- ``info``: ``{"version", "fingerprint", "checksums"}``, written by the primary process only.

Atomicity is Orbax's: on a local or POSIX file system a step is written under
``DIR/<step>.orbax-checkpoint-tmp`` and renamed to ``DIR/<step>`` once every item is complete; on
``gs://`` it is written in place and counts only once ``commit_success.txt`` exists. Anything else is never
listed, so a save killed midway is invisible to ``latest_step``/``restore`` (and is deleted by the first
``save`` of a later ``Checkpointer`` on the directory).

Orbax notices missing or truncated array files and unreadable metadata, but it restores a flipped byte
inside a compressed chunk without complaint; so each save also records a cheap on-device checksum of
every array, checked on restore. A checkpoint that fails either way is skipped with a warning in favour of
the previous one; on a pod the hosts decide together, so every host restores the same step (a host that
cannot read its shards makes all fall back). A checkpoint written for another model or run layout (a
different ``fingerprint``) is never skipped: it raises ``CheckpointMismatchError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pbbjax.core.distributed import all_hosts
from pbbjax.core.storage import orbax_path
from pbbjax.models.sharding import to_host

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_MISSING = "<missing>"


ASYNC_SAVE_TIMEOUT_S = 6 * 3600


class CheckpointError(RuntimeError):
    """No checkpoint in the directory can be read."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was written for another model or run layout than this run's."""


def abstract_like(tree):
    """``tree`` with each array replaced by a ``jax.ShapeDtypeStruct`` carrying its sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def shape_digest(tree) -> str:
    """A short hash of a pytree's paths, shapes and dtypes (arrays or ShapeDtypeStructs): for fingerprints."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    text = ";".join(f"{jax.tree_util.keystr(p)}:{tuple(x.shape)}:{x.dtype}" for p, x in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@jax.jit
def _checksum(x):
    """Order-sensitive 32-bit hash of an array's bits, exact whatever the sharding or reduction order."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    w = jax.lax.bitcast_convert_type(x, words).astype(jnp.uint32)
    index = jnp.zeros(w.shape, jnp.uint32)
    for d, stride in enumerate(np.cumprod((1,) + w.shape[::-1])[-2::-1] if w.ndim else ()):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
    h = (w ^ (index * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B)
    return jnp.sum(h ^ (h >> 13), dtype=jnp.uint32)


@jax.jit
def _checksum_all(arrays):
    return jnp.stack([_checksum(x) for x in arrays])


def _checksums(tree) -> dict[str, list]:
    """{keystr: [dtype, checksum]} for every array leaf: one device program per set of devices the leaves
    live on, each finished before the next starts. On a pod each checksum is a collective, and several
    collective programs in flight at once can deadlock XLA:CPU's gloo."""
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    leaves = [(k, jnp.asarray(x) if isinstance(x, np.ndarray) else x) for k, x in leaves]
    groups: dict[frozenset, list] = {}
    for k, x in leaves:
        if isinstance(x, jax.Array):
            groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append((k, x))
    out = {}
    for _, group in sorted(groups.items(), key=lambda g: sorted(g[0])):  # the same order on every host
        sums = to_host(_checksum_all([x for _, x in group]))
        out |= {k: [str(x.dtype), int(s)] for (k, x), s in zip(group, sums, strict=True)}
    return out


def _normalise(d: dict) -> dict:
    return json.loads(json.dumps(d))


class Checkpointer:
    """Saves and restores ``(state, meta)`` at integer steps in ``directory``, keeping the newest ``keep``.

    Every process must call ``save``/``restore``/``wait``/``close`` together (Orbax's collectives).
    Orbax elects its metadata writer by process index (``primary_host=0``), so ``is_primary`` must agree
    with ``jax.process_index() == 0``; it only decides which process logs.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        fingerprint: dict,
        async_save: bool = True,
        is_primary: bool | None = None,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if is_primary is None:
            is_primary = jax.process_index() == 0
        elif jax.process_count() > 1 and is_primary != (jax.process_index() == 0):
            raise ValueError("Orbax writes checkpoint metadata from process 0; is_primary must match it")
        self.directory = orbax_path(directory)
        self.fingerprint = _normalise(fingerprint)
        self.is_primary = is_primary
        self._corrupt: set[int] = set()  # steps restore() found unreadable: save() may replace them
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # half-written steps of a killed run
            create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
            # Orbax's default (20 min, wall clock) fails a save whose process was suspended meanwhile:
            # a laptop asleep, a paused job. Hung hosts are jax.distributed's heartbeat's to find.
            async_options=ocp.AsyncOptions(timeout_secs=ASYNC_SAVE_TIMEOUT_S),
        )
        items = ("state", "meta", "info")
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=items)

    def _log(self, level: int, msg: str, *args) -> None:
        log.log(level if self.is_primary else logging.DEBUG, msg, *args)

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> None:
        """Starts saving ``state`` and ``meta`` as ``step``; returns once the arrays are copied off device.

        A step that already has a checkpoint is left alone (with a warning) unless ``force`` is set or
        ``restore`` found it unreadable; then it is replaced.
        """
        step = int(step)
        try:
            meta = _normalise(meta)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable (bytes: decode first): {e}") from e
        if step in self._mgr.all_steps():
            if not (force or step in self._corrupt):
                self._log(
                    logging.WARNING, "step %d already saved in %s; not saved again", step, self.directory
                )
                return
            self._mgr.wait_until_finished()
            self._mgr.delete(step)
        self._corrupt.discard(step)
        info = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint, "checksums": _checksums(state)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta), info=ocp.args.JsonSave(info)
        )
        self._mgr.save(step, args=args, force=True)  # the trainer, not Orbax's save policy, picks steps
        self._log(logging.INFO, "saving checkpoint step %d to %s", step, self.directory)

    def latest_step(self) -> int | None:
        """The newest committed step (or one this process is saving), None if there is none."""
        return max(self._mgr.all_steps(), default=None)

    def restore(self, abstract_state) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest readable checkpoint, laid out as ``abstract_state``, or None.

        ``abstract_state``: the state's pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (or arrays).
        """
        self._mgr.wait_until_finished()
        steps = sorted(self._mgr.all_steps(), reverse=True)
        if not steps:
            return None
        failures = []
        for step in steps:
            # Every host decides together: a host that cannot read its part of a step makes every host
            # fall back, so all restore the same step and run the same collectives.
            out, error = None, None
            try:
                info = self._mgr.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
                self._check_fingerprint(step, info.get("fingerprint"))
                out = self._mgr.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
            except CheckpointMismatchError:
                raise
            except Exception as e:  # any failure to read a step means: try the previous one
                error = e
            if all_hosts(error is None):
                try:
                    self._verify(out["state"], info.get("checksums", {}))  # collective on every host
                except ValueError as e:
                    error = e
                if all_hosts(error is None):
                    self._log(logging.INFO, "restored checkpoint step %d from %s", step, self.directory)
                    return out["state"], out["meta"], step
            if error is None:
                reason = "unreadable on another host"
            else:
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
            failures.append(f"step {step}: {reason}")
            self._corrupt.add(step)
            log.warning(  # every host says why it falls back
                "checkpoint %s is unreadable (%s); trying an older one", self.directory / str(step), reason
            )
        raise CheckpointError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))

    def _check_fingerprint(self, step: int, saved: dict | None) -> None:
        saved = saved if isinstance(saved, dict) else {}
        for key in [*self.fingerprint, *(k for k in saved if k not in self.fingerprint)]:
            ours, theirs = self.fingerprint.get(key, _MISSING), saved.get(key, _MISSING)
            if ours != theirs:
                raise CheckpointMismatchError(
                    f"checkpoint in {self.directory} (step {step}) was written for {key}={theirs}, "
                    f"this run has {key}={ours}"
                )

    @staticmethod
    def _verify(state, saved: dict) -> None:
        for key, (dtype, value) in _checksums(state).items():
            if key in saved and saved[key][0] == dtype and saved[key][1] != value:
                raise ValueError(f"checksum mismatch for {key}: array data are corrupted")

    def wait(self) -> None:
        """Blocks until every save started so far is committed (re-raising a failed background save)."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
