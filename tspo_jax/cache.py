"""Folders built once and reused: the toy world, its warm-started policy, BM25 indexes.

A folder is current when its stamp (a JSON file in it, written last) holds the fingerprint of
what it was built from. A build is written into a temporary folder beside its place and renamed
into it whole, so a build killed midway leaves nothing half-written, and of two processes that
build the same folder at once, the first rename wins and the other build is dropped.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def fingerprint(*parts) -> str:
    """A short hash of JSON-serializable parts (settings, versions, other fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def is_current(folder: str | os.PathLike, key: str, stamp: str) -> bool:
    try:
        return json.loads((Path(folder) / stamp).read_text())["fingerprint"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


def build_folder(
    folder: str | os.PathLike, key: str, write: Callable[[Path], dict | None], *, stamp: str
) -> Path:
    """``folder``, built unless it is current: ``write(tmp)`` fills a temporary folder and
    returns what the stamp records besides the fingerprint; the stamp is written, and the
    folder renamed into place (an older build there is removed)."""
    folder = Path(folder)
    if is_current(folder, key, stamp):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    stale = None
    try:
        info = write(tmp) or {}
        (tmp / stamp).write_text(json.dumps({"fingerprint": key, **info}, indent=1) + "\n")
        if folder.exists():  # a build of other settings: moved aside, then removed
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.rename(folder, stale / folder.name)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process renamed its build in first
            if not is_current(folder, key, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return folder
