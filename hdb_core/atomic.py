"""Write files so that a crash or a full disk never leaves a half-written one."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomic(path: str, write: Callable[[str], None]) -> str:
    """Call write(tmp_path) on a temp file beside `path`, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".partial", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
