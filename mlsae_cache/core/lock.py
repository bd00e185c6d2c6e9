"""Writer locks on a store directory that a dead process does not hold.

The lock is `flock` on the store directory itself: the kernel drops it when the holder exits, however it exits
(SIGKILL included), so no stale lock file can block a later run, and no extra file lives inside the store.
A single writer holds it exclusively; the workers of a sharded harvest hold it shared (each also holds its own
shard's directory exclusively), so shards run side by side while any single writer is refused.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from mlsae_cache.core.errors import LockedError


class StoreLock:
    """Context manager holding a lock on the directory `store`: exclusive, or `shared` with other shared holders.

    LockedError when it is taken, at once or after `wait` seconds of retrying (for short critical sections
    such as a shard creating the store while another does the same).
    """

    def __init__(self, store: Path, shared: bool = False, wait: float = 0.0) -> None:
        self.path = Path(store)
        self.shared, self.wait = shared, wait
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def acquire(self) -> StoreLock:
        """Take the lock (for holders that release it outside a `with` block)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        deadline = time.monotonic() + self.wait
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockedError(
                        f"{self.path} is being written by another process; wait for it to finish or stop it"
                    ) from None
                time.sleep(0.05)
        self._fd = fd
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
