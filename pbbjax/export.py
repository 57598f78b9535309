"""``python -m pbbjax.export --checkpoint DIR --out HF_DIR [--stage NAME] [--step N]``: a run's Orbax
checkpoint -> a Hugging Face model directory, on CPU, for any model size (``pbbjax.training.export``);
``--push-to-hub ORG/NAME`` then adds a model card and uploads the directory (``pbbjax.models.hub``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
from pathlib import Path

import jax

from pbbjax.core import console
from pbbjax.core.distributed import launched_process_index
from pbbjax.models import hub
from pbbjax.models.architecture import DTYPES
from pbbjax.training.export import (
    ExportError,
    as_path,
    export_checkpoint,
    find_checkpoints,
    select_checkpoint,
)


def _push_to_hub(out, checkpoint, stage, step, repo_id: str, token: str, public: bool) -> None:
    """The model card (from the run's results.json) into the export ``out``, then ``out`` to the Hub."""
    found, workdir = find_checkpoints(checkpoint)
    picked = select_checkpoint(found, as_path(checkpoint), stage, step)
    hub.push_with_card(Path(out), workdir / "results.json", picked, repo_id, token, public=public)


def _return_freed_buffers_to_the_os() -> None:
    """glibc keeps freed buffers below its adaptive mmap threshold (up to 32 MiB) in the heap, where a
    stream of tensor-sized buffers fragments it (measured: +25-35% peak RSS); with a fixed 1 MiB threshold
    each buffer is unmapped when freed. Other C libraries: nothing to do."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pbbjax.export", description="A run's Orbax checkpoint -> a Hugging Face directory."
    )
    arg = parser.add_argument
    arg("--checkpoint", required=True, help="a run's workdir, its checkpoints/ dir, or one step dir")
    arg("--out", required=True, help="the HF directory to write (replaced whole)")
    arg("--stage", help="export the newest checkpoint of this stage (or its stage end)")
    arg("--step", type=int, help="export the checkpoint of this global step")
    arg("--model", help="the HF directory the run started from (default: <workdir>/source_model)")
    arg("--dtype", choices=sorted(DTYPES), help="the exported dtype (default: the checkpoint's)")
    arg("--max-shard-bytes", type=int, default=2 * 1024**3, help="safetensors shard size (default 2 GiB)")
    arg("--push-to-hub", metavar="ORG/NAME", help="then upload the export with a model card to this Hub repo")
    arg("--public", action="store_true", help="with --push-to-hub: a public repository (default: private)")
    arg("--adapter", action="store_true", help="a LoRA run's adapters alone, as a peft adapter directory")
    arg("--verbose", action="store_true", help=console.VERBOSE_HELP)
    args = vars(parser.parse_args(argv))
    console.configure(args.pop("verbose"))
    if args["max_shard_bytes"] <= 0:
        parser.error("--max-shard-bytes must be positive")
    repo_id, public = args.pop("push_to_hub"), args.pop("public")
    if public and not repo_id:
        parser.error("--public is for --push-to-hub")
    if (index := launched_process_index()) != 0:  # a host-side tool: one host of a pod writes
        print(f"pbbjax.export: process {index} of a pod: process 0 exports; nothing to do here")
        return
    try:
        token = hub.check_push(repo_id) if repo_id else None  # before any compute
        jax.config.update("jax_platforms", "cpu")  # never claims an accelerator a run may be using
        _return_freed_buffers_to_the_os()
        checkpoint, out = args.pop("checkpoint"), args.pop("out")
        export_checkpoint(checkpoint, out, **args)
        if repo_id:
            _push_to_hub(out, checkpoint, args["stage"], args["step"], repo_id, token, public)
    except (ExportError, hub.HubError) as e:
        raise SystemExit(f"pbbjax.export: error: {e}") from None


if __name__ == "__main__":
    main()
