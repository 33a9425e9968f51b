"""A real PostgreSQL server for tests: initdb into a temporary folder, pg_ctl on a free port of 127.0.0.1.

:func:`postgres_server` is the body of the session fixture ``postgres_url`` in conftest.py. When ``initdb``/``pg_ctl``
are missing it installs Debian's ``postgresql`` package; it skips (with the reason) only when that is impossible.
PostgreSQL refuses to run as root, so as root the server runs as ``nobody`` (``runuser``).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def _find_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return cands[0] if cands else None


def _install() -> str | None:
    """apt-get install postgresql; the reason it could not, or None."""
    if not shutil.which("apt-get"):
        return "initdb/pg_ctl not found and apt-get is not available to install PostgreSQL"
    if os.geteuid() != 0:
        return "initdb/pg_ctl not found and installing PostgreSQL with apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
        if r.returncode != 0:
            return f"initdb/pg_ctl not found and `{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_server(dbname: str = "autosearch_test") -> Iterator[str]:
    """Start a throw-away server; yield ``postgresql+psycopg://postgres@127.0.0.1:PORT/DBNAME``; stop it after."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("the psycopg driver is not installed: pip install 'psycopg[binary]' (the [postgres] extra)")
    initdb, pg_ctl = _find_bin("initdb"), _find_bin("pg_ctl")
    if not (initdb and pg_ctl):
        why = _install()
        initdb, pg_ctl = _find_bin("initdb"), _find_bin("pg_ctl")
        if why or not (initdb and pg_ctl):
            pytest.skip(why or "PostgreSQL was installed but initdb/pg_ctl are still not found")
    assert initdb and pg_ctl
    root = Path(tempfile.mkdtemp(prefix="as_pg_"))
    os.chmod(root, 0o755)
    data = root / "data"
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse root: run them as nobody
        user = "nobody"
        data.mkdir()
        shutil.chown(data, user=user)
        shutil.chown(root, user=user)
        prefix = ["runuser", "-u", user, "--"]

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, check=False, cwd=root)

    r = run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {(r.stderr or r.stdout).strip()[-400:]}")
    port = _free_port()
    opts = f"-p {port} -h 127.0.0.1 -k {root} -c fsync=off -c max_connections=200"
    r = run([pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-o", opts, "-w", "-t", "60", "start"])
    if r.returncode != 0:
        log = (root / "server.log").read_text()[-400:] if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {(r.stderr or r.stdout).strip()[-300:]} {log}")
    try:
        deadline = time.time() + 30
        while True:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {dbname}")
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{dbname}"
    finally:
        run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
