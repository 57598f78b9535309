"""What every ``python -m pbbjax.*`` command shows on the console, set up in one place.

By default a command prints its progress lines, tables and the paths it writes on stdout, and on stderr
only warnings and errors (one plain line each, ``WARNING name: message``). Other INFO-level logs are
hidden: absl's and Orbax's ("saving checkpoint ..."), JAX probing for a TPU ("Unable to initialize
backend 'tpu'"), matplotlib's ("Using categorical units ...", "generated new fontManager"),
transformers' advice ("PyTorch was not found", which pbbjax never needs). ``--verbose`` shows them all.

A command calls ``configure(verbose)`` first thing in its ``main``, before it initialises a JAX backend
or imports transformers.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
from pathlib import Path

VERBOSE_HELP = "show the INFO logs of pbbjax and its libraries (absl, orbax, jax, matplotlib, transformers)"
_GOOGLE_PCI_VENDOR = "0x1ae0"  # how JAX itself tells that a TPU chip is attached


def configure(verbose: bool = False) -> None:
    level = logging.INFO if verbose else logging.WARNING
    # one plain handler on the root logger in place of absl's (``absl.app.run`` installs it), so that
    # absl, orbax, jax, matplotlib and pbbjax's own loggers all stop at the same level; other handlers
    # (a caller's, pytest's) stay, and a second call adds nothing
    from absl import logging as absl_logging

    root = logging.getLogger()
    if absl_logging.get_absl_handler() in root.handlers:
        root.removeHandler(absl_logging.get_absl_handler())
    if not any(isinstance(h, _ConsoleHandler) for h in root.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        _skip_absent_tpu()


class _ConsoleHandler(logging.StreamHandler):
    """The handler ``configure`` installs (a class of its own, so that it is installed once)."""


def _skip_absent_tpu() -> None:
    """With libtpu installed (the ``tpu`` and ``test`` extras) on a machine without a TPU, JAX still tries
    the TPU backend, and libtpu writes a page of errors to stderr before it gives up and JAX falls back to
    the CPU. Where nothing but the CPU can be found (no TPU chip or device file, no TPU pod in the
    environment, no other JAX plugin) this goes straight to the CPU: the same devices, without the page.
    ``JAX_PLATFORMS`` or ``JAX_FORCE_TPU_INIT`` set by the user is left alone."""
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    if importlib.util.find_spec("libtpu") is None or importlib.util.find_spec("jax_plugins") is not None:
        return
    if any(os.environ.get(k) for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_NAME")):
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    vendors = glob.glob("/sys/bus/pci/devices/*/vendor")
    if any(Path(v).read_text().strip() == _GOOGLE_PCI_VENDOR for v in vendors):
        return
    import jax

    jax.config.update("jax_platforms", "cpu")
