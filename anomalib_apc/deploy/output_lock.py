"""An exclusive lock on an output folder, so that two runs writing into one folder fail instead of mixing.

The lock is the operating system's (``fcntl.flock`` on POSIX, ``msvcrt.locking`` on Windows) on a
file in the folder: it is released when the holder exits, however it exits, so a killed run leaves
no stale lock behind. The file itself stays (removing a lock file while another process waits on it
would let two holders in).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from anomalib_apc.errors import OutputExistsError

LOCK_FILE = ".anomalib-apc.lock"

try:
    import fcntl

    def _try_lock(descriptor: int) -> bool:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

except ImportError:  # Windows
    import msvcrt

    def _try_lock(descriptor: int) -> bool:
        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


@contextmanager
def locked_output(directory: Path, what: str) -> Iterator[None]:
    """Hold the lock of ``directory`` (created if missing) for the ``with`` block.

    Raises:
        OutputExistsError: Another process holds it: ``what`` (e.g. "predict") is writing there now.
    """
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(descriptor):
            msg = (f"{directory}: another {what} is writing into this folder now; wait for it to finish "
                   "or choose another --output.")
            raise OutputExistsError(msg)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock
