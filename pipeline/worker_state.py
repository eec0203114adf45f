"""Where a running worker can be found: a pid file under the data directory.

Only one process can open the embedded warehouse, so other commands (``sql``,
``demo``'s summary, ``wait``) first ask whether a worker runs and, if so, go through
its HTTP endpoint on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.settings import Settings, private_dir


def pidfile_path(settings: Settings) -> Path:
    """``<data dir>/worker.json``."""
    return settings.data_path / "worker.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_worker(settings: Settings) -> dict[str, Any] | None:
    """The running worker's pid and web URL, or ``None``."""
    path = pidfile_path(settings)
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not _alive(int(info.get("pid", 0))):
        return None
    return info


@contextmanager
def worker_pidfile(settings: Settings) -> Iterator[None]:
    """Announce this process as the worker while the block runs."""
    path = pidfile_path(settings)
    private_dir(path.parent)
    other = running_worker(settings)
    if other and int(other["pid"]) != os.getpid():
        raise RuntimeError(f"a worker already runs with pid {other['pid']}")
    path.write_text(json.dumps({"pid": os.getpid(), "url": settings.web_url}))
    try:
        yield
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (FileNotFoundError, ValueError):
            pass
