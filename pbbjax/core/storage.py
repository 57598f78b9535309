"""Workdirs on ``gs://`` (or any fsspec URL): checked before any compute, and mirrored for the small files.

A run's workdir holds checkpoints (large, written by orbax) and small files (``results.json``,
``metrics.jsonl``, ``plots/``, ``source_model/``, ``tensorboard/``, ``export/``) that are written by
code expecting a local directory: matplotlib, an appended log, ``save_pretrained``. :class:`Workdir`
sends the checkpoints straight to the URL (orbax and tensorstore speak ``gs://``), and keeps the small
files in a local mirror that it fills from the URL when a run starts (so a run restarted on a new VM sees
its results and metrics) and uploads after each write that matters (results, checkpoints, plots,
exports). The launcher's worker logs (``logs/``) sit beside them and are never downloaded. A local
workdir is its own mirror and nothing is copied.

Credentials are found the Google way: ``GOOGLE_APPLICATION_CREDENTIALS``, the gcloud
application-default file, or the metadata server of a Google Cloud VM (a TPU VM's service account). A run
without any of them would fail only at its first checkpoint; :func:`check_workdir` fails at once, naming
the workdir and what to do, and never waits on the network for longer than ``timeout_s``.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import uuid
from pathlib import Path


class WorkdirError(RuntimeError):
    """The workdir cannot be written."""


def credentials_source() -> str | None:
    """Where Google credentials would come from, found without any network call; None if nowhere."""
    if path := os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return f"GOOGLE_APPLICATION_CREDENTIALS={path}" if Path(path).is_file() else None
    config = Path(os.environ.get("CLOUDSDK_CONFIG") or Path.home() / ".config" / "gcloud")
    if (adc := config / "application_default_credentials.json").is_file():
        return str(adc)
    if os.environ.get("NO_GCE_CHECK", "").lower() not in ("1", "true"):
        product = Path("/sys/class/dmi/id/product_name")
        if product.is_file() and "Google" in product.read_text():
            return "the Google Cloud VM's service account (metadata server)"
    return None


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def orbax_path(path: str | os.PathLike):
    """``path`` as every Orbax call takes it: an ``epath.Path``, made absolute when local (Orbax's OCDBT
    format refuses a relative path, such as a workdir given as ``runs/...``); a URL is absolute already."""
    from etils import epath

    return epath.Path(path if is_remote(path) else os.path.abspath(path))


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a URL; a clear error when its package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise WorkdirError(
            f"workdir {url!r} needs an fsspec backend ({e}); for gs:// paths: pip install 'pbbjax[tpu]'"
        ) from None


def _write_probe(workdir: str) -> None:
    fs, root = filesystem(workdir)
    probe = f"{root.rstrip('/')}/.pbbjax-write-check-{uuid.uuid4().hex}"
    fs.pipe(probe, b"ok")
    fs.rm(probe)


class Workdir:
    """A run's workdir: ``local`` is where its small files are written (the workdir itself, or for a URL a
    mirror under the temp directory); :meth:`url` is where a checkpoint directory goes."""

    def __init__(self, location: str | os.PathLike, mirror_root: str | os.PathLike | None = None):
        self.location = str(location)
        self.remote = is_remote(self.location)
        if self.remote:
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", self.location)[-80:]
            digest = hashlib.sha256(self.location.encode()).hexdigest()[:8]
            root = Path(mirror_root or Path(tempfile.gettempdir()) / "pbbjax-workdirs")
            self.local = root / f"{name}-{digest}"
        else:
            self.local = Path(self.location)

    def __str__(self) -> str:
        return self.location

    def url(self, *parts: str) -> str:
        """The workdir's ``parts`` (for orbax): a URL joined with "/", or a local path."""
        if self.remote:
            return "/".join([self.location.rstrip("/"), *parts])
        return str(self.local.joinpath(*parts))

    def pull(self, *names: str) -> None:
        """Replace the mirror's files ``names`` with the URL's, where it has them (a restart on a fresh VM
        resumes with its results and metrics; plots and exports are written anew)."""
        if not self.remote:
            return
        fs, root = filesystem(self.location)
        for name in names:
            remote = f"{root.rstrip('/')}/{name}"
            if not fs.isfile(remote):
                continue
            target = self.local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.pull")
            tmp.write_bytes(fs.cat_file(remote))
            tmp.replace(target)

    def push(self, *names: str) -> None:
        """Upload the mirror's files or directories ``names`` (relative to the workdir; missing ones are
        skipped) to the URL."""
        if not self.remote:
            return
        fs, root = filesystem(self.location)
        root = root.rstrip("/")
        for name in names:
            source = self.local / name
            files = sorted(source.rglob("*")) if source.is_dir() else [source]
            for path in filter(Path.is_file, files):
                fs.pipe_file(f"{root}/{path.relative_to(self.local).as_posix()}", path.read_bytes())


def check_workdir(workdir: str, timeout_s: float = 30.0) -> None:
    """Raise WorkdirError unless a ``gs://`` workdir can be written; other workdirs pass unchecked."""
    if not workdir.startswith("gs://"):
        return
    source = credentials_source()
    if source is None:
        raise WorkdirError(
            f"workdir {workdir!r} is on Google Cloud Storage, but no Google credentials were found: set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, run `gcloud auth "
            "application-default login`, or run on a TPU VM whose service account may write to the bucket"
        )
    outcome: list[BaseException | None] = []
    # A daemon thread: a probe stuck on the network must not keep the failing process alive.
    thread = threading.Thread(target=lambda: outcome.append(_try(_write_probe, workdir)), daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise WorkdirError(
            f"workdir {workdir!r}: no answer from Google Cloud Storage within {timeout_s:.0f} s "
            f"(credentials: {source}); check the network and the bucket name"
        )
    if isinstance(e := outcome[0], WorkdirError):
        raise e
    if e is not None:
        raise WorkdirError(
            f"workdir {workdir!r} cannot be written ({type(e).__name__}: {e}); credentials: {source}. Check "
            "that the bucket exists and that these credentials may write to it"
        )


def _try(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except Exception as e:
        return e
    return None
