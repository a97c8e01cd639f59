"""Throwaway PostgreSQL clusters for the test suite.

The tests run against a real PostgreSQL 15, not a mock: ``throwaway_cluster()`` initialises a
private cluster in a temporary directory, starts it on a random free port of 127.0.0.1 (its unix
socket also lives in that directory, as /var/run/postgresql may not exist), yields the SQLAlchemy
URL, and on exit stops it and deletes everything. fsync is off: the data is disposable.

If PostgreSQL cannot be started this raises RuntimeError with the server log; it never skips, so a
machine without PostgreSQL fails loudly (``scripts/install`` installs it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

_PG_USER = "postgres"  # initdb refuses to run as root, so root runs the binaries as this user
_START_ATTEMPTS = 3  # a free port can be taken between probing it and the server binding it
_LOG_TAIL_LINES = 40


def postgres_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's versioned dirs."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    debian = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if d.parent.name.isdigit()]
    # Prefer 15 (what the project targets), then the newest installed.
    debian.sort(key=lambda d: (d.parent.name != "15", -int(d.parent.name)))
    for d in debian:
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    raise RuntimeError(
        "PostgreSQL not found: no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin "
        "(run scripts/install)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs a PostgreSQL binary, as the postgres user when we are root."""
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", _PG_USER, "--", *cmd]
    # cwd: the postgres user may not be allowed into the caller's working directory.
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=90, check=False)


def _log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no server log: {e})"
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def _output(proc: subprocess.CompletedProcess[str]) -> str:
    return (proc.stdout + proc.stderr).strip()


def _make_tmpdir() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="keybroker-pg-"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(_PG_USER)
        except KeyError:
            shutil.rmtree(tmp)
            raise RuntimeError(
                f"running as root but there is no {_PG_USER!r} user to run PostgreSQL as "
                "(run scripts/install)"
            ) from None
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    return tmp


def _remove(tmp: Path) -> None:
    # An immediate stop can leave the postmaster's last files appearing for a moment.
    for _ in range(20):
        try:
            shutil.rmtree(tmp)
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)
        else:
            return
    shutil.rmtree(tmp)


def _start(pg_ctl: Path, data: Path, log: Path, tmp: Path, port: int | None = None) -> int:
    """Starts the server and returns its port (a free one, retried if it was taken meanwhile;
    or exactly `port`)."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        chosen = port or _free_port()
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {chosen} -k {shlex.quote(str(tmp))} "
            "-c fsync=off -c max_connections=200"
        )
        # -w: return only once the server accepts connections (or failed).
        proc = _run(
            [str(pg_ctl), "-D", str(data), "-l", str(log), "-w", "-t", "30", "-o", opts, "start"],
            tmp,
        )
        if proc.returncode == 0:
            return chosen
        tail = _log_tail(log)
        port_taken = "could not bind" in tail or "already in use" in tail
        if port is not None or not port_taken or attempt == _START_ATTEMPTS:
            break
    raise RuntimeError(
        f"PostgreSQL did not start (pg_ctl exit {proc.returncode}): {_output(proc)}\n"
        f"--- server log ({log}) ---\n{tail}"
    )


class Cluster:
    """A private PostgreSQL cluster that tests may stop and start again (on the same port)."""

    def __init__(self, bin_dir: Path, tmp: Path) -> None:
        self._pg_ctl = bin_dir / "pg_ctl"
        self._tmp = tmp
        self._data, self._log = tmp / "data", tmp / "log"
        self.port = 0

    @property
    def url(self) -> str:
        """The ``postgresql+asyncpg://`` URL of its ``postgres`` database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Starts it (again, on the port it had); returns once it accepts connections."""
        self.port = _start(self._pg_ctl, self._data, self._log, self._tmp, self.port or None)

    def stop(self, mode: str = "fast") -> None:
        """Stops it: "fast" ends every session at once, "immediate" is a crash."""
        proc = _run([str(self._pg_ctl), "-D", str(self._data), "-m", mode, "stop"], self._tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed: {_output(proc)}")


@contextlib.contextmanager
def private_cluster() -> Iterator[Cluster]:
    """Starts a private PostgreSQL cluster; yields it, to stop and start at will.

    The cluster has the superuser ``postgres`` (trust auth, no password) and the ``postgres``
    database. It is stopped and its directory removed when the context exits.
    """
    bin_dir = postgres_bin_dir()
    tmp = _make_tmpdir()
    data = tmp / "data"
    try:
        initdb = [str(bin_dir / "initdb"), "-D", str(data)]
        initdb += ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"]
        init = _run(initdb, tmp)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {init.returncode}):\n{_output(init)}")
        cluster = Cluster(bin_dir, tmp)
        cluster.start()
        yield cluster
    finally:
        try:
            if (data / "postmaster.pid").exists():
                _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], tmp)
        finally:
            _remove(tmp)


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A private cluster (see private_cluster) that runs throughout; yields its URL."""
    with private_cluster() as cluster:
        yield cluster.url
