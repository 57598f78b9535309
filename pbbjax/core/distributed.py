"""Joining the processes of a pod: ``jax.distributed.initialize`` with its settings from config or env.

Config fields: ``distributed`` ("auto": initialize when the environment shows a pod or cluster; "on":
always; "off": never) and ``cluster.*``: ``coordinator_address`` ("host:port"), ``num_processes``,
``process_id`` (empty / 0 / -1 = from the environment, ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``, which ``python -m pbbjax.local_pod`` sets, else JAX's own detection: TPU VMs, SLURM),
``initialization_timeout_s`` (how long to wait for every process to join) and ``heartbeat_timeout_s``
(how soon the others notice a process that died).

Must run before anything touches a JAX backend.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

_CLUSTER_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
)

CLUSTER_DEFAULTS = dict(
    coordinator_address="",
    num_processes=0,
    process_id=-1,
    initialization_timeout_s=300,
    heartbeat_timeout_s=100,
)


def launched_process_index() -> int:
    """This process's index in a pod as its launcher says (``JAX_PROCESS_ID``; a TPU VM's
    ``TPU_WORKER_ID``), without joining the pod; 0 outside one. For host-side tools that one host runs."""
    if (value := _env_int("JAX_PROCESS_ID")) is not None:
        return value
    worker = os.environ.get("TPU_WORKER_ID", "")  # libtpu may fill it with a warning text off a TPU VM
    return int(worker) if worker.isdigit() else 0


def _detected() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return any(os.environ.get(k) for k in _CLUSTER_ENV if k != "TPU_WORKER_HOSTNAMES") or "," in hosts


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def joins_pod(mode: str) -> bool:
    """Whether ``initialize(mode)`` joins this process to a pod (``mode``: the ``distributed`` config field),
    without touching JAX."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config field 'distributed' is {mode!r}; expected 'auto', 'on' or 'off'")
    return mode == "on" or (mode == "auto" and _detected())


def initialize(mode: str = "auto", cluster: dict | None = None) -> bool:
    """``jax.distributed.initialize`` when ``mode`` asks for it; True if it ran (or had run already)."""
    if not joins_pod(mode):
        return False
    if jax.distributed.is_initialized():
        return True
    c = {**CLUSTER_DEFAULTS, **(cluster or {})}
    unknown = set(c) - set(CLUSTER_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config fields cluster.{', cluster.'.join(sorted(unknown))}")
    address = c["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = c["num_processes"] or _env_int("JAX_NUM_PROCESSES")
    index = c["process_id"] if c["process_id"] >= 0 else _env_int("JAX_PROCESS_ID")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"process id {index} is not in [0, {count}) (cluster.process_id, JAX_PROCESS_ID)")
    timeout = int(c["initialization_timeout_s"])
    if address and index:  # process 0 serves the coordinator; the others must reach it first
        _wait_for_coordinator(address, index, count, timeout)
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            initialization_timeout=timeout,
            heartbeat_timeout_seconds=int(c["heartbeat_timeout_s"]),
        )
    except Exception as e:
        raise RuntimeError(
            f"process {index} of {count} could not join the pod through the coordinator at {address} "
            f"within cluster.initialization_timeout_s={c['initialization_timeout_s']} s: {e}"
        ) from e
    return True


def _wait_for_coordinator(address: str, index: int, count: int | None, timeout: float) -> None:
    """Until the coordinator accepts a TCP connection; a clear error after ``timeout`` seconds (JAX itself
    aborts the process with a C++ fatal error there, which names neither the address nor the setting)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"process {index} of {count} could not join the pod through the coordinator at "
                    f"{address} within cluster.initialization_timeout_s={timeout} s ({e}); is process 0 "
                    "running, and is cluster.coordinator_address / JAX_COORDINATOR_ADDRESS right?"
                ) from None
            time.sleep(0.5)


def same_on_every_host(value: str | int, what: str) -> None:
    """Raise unless every process has the same ``value`` (a collective: every process must call it). For
    what each host derives on its own and must agree on: step counts, data positions, config digests."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(str(value).encode()).digest()[:8]
    ours = np.frombuffer(digest, np.uint32)
    every = np.asarray(multihost_utils.process_allgather(ours)).reshape(jax.process_count(), -1)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], ours)]
    if differ:
        raise RuntimeError(
            f"{what} differs between hosts: process {jax.process_index()} has {value!r}, processes "
            f"{differ} have something else (do all hosts run the same code, config and data?)"
        )


def all_hosts(ok: bool) -> bool:
    """True when ``ok`` is true on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(ok)
    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(ok)))))
