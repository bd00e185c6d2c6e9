"""An exclusive writer lock on a store directory that a dead process does not hold.

The lock is `flock` on the store directory itself: the kernel drops it when the holder exits, however it exits
(SIGKILL included), so no stale lock file can block a later run, and no extra file lives inside the store.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from mlsae_cache.errors import LockedError


class StoreLock:
    """Context manager holding an exclusive lock on the directory `store`; LockedError at once if it is taken."""

    def __init__(self, store: Path) -> None:
        self.path = Path(store)
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(
                f"{self.path} is being written by another process; wait for it to finish or stop it"
            ) from None
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
