"""An advisory lock on the data directory: servers share it, offline admin work takes it alone.

`keybroker master-key rotate` must not run under a live broker on the same data directory: that
broker would keep sealing new root keys under the old master key, which rotation then deletes.
Brokers on other machines (sharing a PostgreSQL database) cannot be seen from here; the README
says to stop every replica first.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from broker.core.errors import ConfigurationError

LOCK_FILE = "keybroker.lock"


@contextmanager
def locked(data_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """Holds the data directory's lock (shared or exclusive) or refuses at once."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = "a keybroker server is running on" if exclusive else "an admin command holds"
            raise ConfigurationError(f"{holder} {data_dir}: stop it first") from None
        yield
    finally:
        os.close(fd)
