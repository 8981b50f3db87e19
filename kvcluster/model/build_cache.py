"""The build cache: what a start derives from a model file in seconds (the GGUF tokenizer, the
dequantized GGUF weights), kept so that a later start with the same inputs reads it instead.

It lives in `KVC_CACHE_DIR` (default `$XDG_CACHE_HOME/kvcluster`, else `~/.cache/kvcluster`; set it
empty to turn the cache off), one folder per kind. An entry is named by everything its content depends
on and carries a checksum of its bytes, checked on every read: a missing, unreadable or corrupt entry is
built again, never used. Entries are written whole or not at all (a temporary file, then a rename), so
workers starting at once on one machine may both build an entry but never read half of one. An
unwritable folder only means no cache, and so does a disk that an entry would leave with less than
`FREE_MARGIN` free.
"""

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
FREE_MARGIN = 2 << 30  # bytes an entry must leave free on its disk


def cache_dir(kind: str) -> Path | None:
    """The folder of one kind of entry (see the module's docstring); None when KVC_CACHE_DIR is empty."""
    configured = os.environ.get("KVC_CACHE_DIR")
    if configured is not None:
        return Path(configured) / kind if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvcluster" / kind


def write_entry(path: Path, write: Callable[[Path], None], size: int) -> None:
    """Make the entry `path` (about `size` bytes) with `write(temporary_path)`, then rename it into place;
    when it cannot be written, a log line says so and the next start builds it again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(path.parent).free < size + FREE_MARGIN:
            log.info("%s not cached: its disk would have less than %d MiB free", path.name, FREE_MARGIN >> 20)
            return
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.close(fd)
        try:
            write(Path(temporary))
            os.replace(temporary, path)  # whole or absent, whoever else writes it at the same time
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        log.info("%s not cached (%s): the next start builds it again", path.name, exc)
