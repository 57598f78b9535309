"""A ``gs://`` workdir is checked before any compute: credentials found, and the bucket writable in time.

Checkpoints go through orbax, which reaches ``gs://`` through etils' ``epath`` (fsspec's ``gcsfs``) and
tensorstore. Both find credentials the Google way: ``GOOGLE_APPLICATION_CREDENTIALS``, the gcloud
application-default file, or the metadata server of a Google Cloud VM (a TPU VM's service account). A run
without any of them would fail only at its first checkpoint; this check fails at once, naming the workdir
and what to do, and never waits on the network for longer than ``timeout_s``.
"""

from __future__ import annotations

import os
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


def _write_probe(workdir: str) -> None:
    try:
        import gcsfs
    except ImportError:
        raise WorkdirError(
            f"workdir {workdir!r} needs gcsfs for gs:// paths: pip install 'pbbjax[tpu]'"
        ) from None

    fs = gcsfs.GCSFileSystem()
    probe = f"{workdir.rstrip('/')}/.pbbjax-write-check-{uuid.uuid4().hex}"
    fs.pipe(probe, b"ok")
    fs.rm(probe)


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
