"""The commit a run runs. It is looked up once, when the run starts (``--ref`` by ``git ls-remote``, or this
checkout's HEAD with ``--from-local``), recorded in the run's gs:// workdir as ``pbbtpu-run.json``, and from
then on it is the only code any worker of the run gets: a VM recreated after a preemption days later
checks out that commit, not whatever the branch or this checkout's HEAD is by then. ``--repin`` looks the
commit up again and records the new one (to move a run to new code on purpose)."""

from __future__ import annotations

import json
import re
import time

from pbbtpu_lib import ROOT, UsageError
from pbbtpu_shell import Failed

RECORD = "pbbtpu-run.json"
FULL_SHA = re.compile(r"[0-9a-f]{40}")


def record_url(a) -> str | None:
    """Where the run keeps its record: only a gs:// workdir outlives the VMs and this machine."""
    workdir = getattr(a, "workdir", "") or ""
    return f"{workdir.rstrip('/')}/{RECORD}" if workdir.startswith("gs://") else None


def pin_commit(a, sh) -> str:
    """The run's commit: the recorded one, else (a new run, or ``--repin``) the one looked up now."""
    url = record_url(a)
    recorded = read_record(url, sh) if url and not getattr(a, "repin", False) else None
    if recorded:
        commit = recorded["commit"]
        if not a.from_local and FULL_SHA.fullmatch(a.ref) and a.ref != commit:
            raise UsageError(
                f"--ref {a.ref} is not the commit the run in {a.workdir} started with ({commit}): "
                "add --repin to move the run to it"
            )
        if a.from_local:
            _check_local_commit(commit, sh)
        sh.note(
            f"the run's commit: {commit} (recorded {recorded['recorded']}, from {recorded['source']}); "
            "--repin moves the run to new code"
        )
        return commit
    commit = _local_head(a, sh) if a.from_local else _remote_commit(a, sh)
    if url:
        write_record(url, commit, a, sh)
        sh.note(f"recorded {commit} in {url}: every VM of this run checks out this commit")
    return commit


def read_record(url: str, sh) -> dict | None:
    res = sh.run(["gcloud", "storage", "cat", url], kind="storage", capture=True, check=False)
    if sh.dry_run:
        sh.note(f"dry run: as if {url} did not exist yet (a new run)")
        return None
    if res.returncode:
        if re.search(r"matched no objects|not ?found", res.stderr, re.IGNORECASE):
            return None
        raise Failed(f"cannot read the run's record {url}: {res.stderr.strip()}")
    try:
        record = json.loads(res.stdout)
        if FULL_SHA.fullmatch(record["commit"]):
            return record
    except (ValueError, KeyError, TypeError):
        pass
    raise Failed(f"{url} is not a pbbtpu run record (no full commit in it): fix or delete it, or --repin")


def write_record(url: str, commit: str, a, sh) -> None:
    source = f"{ROOT} HEAD (--from-local)" if a.from_local else f"{a.repo} {a.ref}"
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps({"commit": commit, "source": source, "recorded": when}, indent=1) + "\n"
    sh.run(["gcloud", "storage", "cp", "-", url], kind="storage", input=text)


def _remote_commit(a, sh) -> str:
    if FULL_SHA.fullmatch(a.ref):
        return a.ref
    res = sh.run(["git", "ls-remote", a.repo, a.ref], kind="git", capture=True, check=False)
    if sh.dry_run:
        sh.note(f"dry run: <commit of {a.ref}> stands for the commit git ls-remote names")
        return f"<commit of {a.ref}>"
    if res.returncode:
        raise UsageError(f"--repo: cannot look up {a.ref!r} in {a.repo}: {res.stderr.strip()}")
    refs = {name: sha for sha, name in (line.split() for line in res.stdout.splitlines() if line.strip())}
    for name in (a.ref, f"refs/tags/{a.ref}^{{}}", f"refs/tags/{a.ref}", f"refs/heads/{a.ref}"):
        if name in refs:  # in git's own order; a tag's ^{} line is the commit an annotated tag names
            return refs[name]
    raise UsageError(f"--ref: {a.repo} has no branch or tag {a.ref!r} (give a commit in full, 40 hex digits)")


def _local_head(a, sh) -> str:
    git = ["git", "-C", str(ROOT)]
    status = sh.run([*git, "status", "--porcelain"], kind="git", capture=True, check=False)
    head = sh.run([*git, "rev-parse", "--verify", "HEAD^{commit}"], kind="git", capture=True, check=False)
    if sh.dry_run:
        sh.note("dry run: <commit of HEAD> stands for this checkout's HEAD, which must be clean")
        return "<commit of HEAD>"
    if head.returncode or status.returncode:
        raise UsageError(f"--from-local ships a git commit, and {ROOT} is not a git checkout with one")
    head, changes = head.stdout.strip(), status.stdout.splitlines()
    if changes and not a.allow_dirty:
        shown = ", ".join(c.strip() for c in changes[:5]) + (" ..." if len(changes) > 5 else "")
        raise UsageError(
            f"--from-local: {ROOT} has uncommitted changes ({shown}); only commits travel: commit them, "
            f"or add --allow-dirty to ship HEAD ({head}) without them"
        )
    if changes:
        sh.note(f"--allow-dirty: shipping HEAD {head} without {len(changes)} uncommitted change(s)")
    return head


def _check_local_commit(commit: str, sh) -> None:
    cmd = ["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"]
    res = sh.run(cmd, kind="git", capture=True, check=False)
    if res.returncode:
        raise UsageError(
            f"--from-local: the run's commit {commit} is not in {ROOT} (fetch it), or add --repin to "
            "move the run to this checkout's HEAD"
        )
