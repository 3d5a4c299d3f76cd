"""Writing files and folders so that a reader never sees half of one: write beside, then rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a fresh temp folder next to `dest`; on success it replaces `dest` (the old one is kept as
    `dest.old` until the new one is in place, so a crash leaves one complete folder), on error it is removed."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, dest)


def swap_in(tmp: Path, dest: Path):
    """Put the complete folder `tmp` in place of `dest`, keeping the previous `dest` as `dest.old` until then."""
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
    # without dest (a crash fell between these two renames before) .old is the only complete copy: it stays
    # until the new folder is in place
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dest: Path | str, mode: str = "wb") -> Iterator:
    """Open a temp file in `dest`'s folder; on success it is renamed onto `dest` with a normal file mode."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=dest.suffix + ".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a normal file's mode is what users expect
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(dest: Path | str, text: str):
    with atomic_file(dest, "w") as f:
        f.write(text)
