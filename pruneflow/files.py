"""Writing a file so that it appears whole or not at all."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield ``<path>.partial`` to write, then move it onto ``path``: a reader never sees half a file. A write
    that fails (a full disk, an exporter error) removes its partial file, so the space it took is free again
    for what comes next, such as marking the run FAILED in a sqlite store on the same disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
