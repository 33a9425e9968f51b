"""The analysis and warm start of a study run once: claimed through the storage, held by a lease.

A claim is a small study of its own in the same storage, named ``<study>/warm-start/<n>`` (``n`` = 1, 2, ...:
its generation). Creating a study whose name exists fails in every Optuna storage, through public API
(``storage.create_new_study`` raises ``DuplicatedStudyError``): in an RDB storage it is an INSERT that the unique
index on the study name lets exactly one transaction make, on SQLite (writes serialised by the database lock)
as on PostgreSQL (a second INSERT of the key waits for the first to commit, then fails); in memory, a lock. So
exactly one process makes each generation: that one holds the claim. Setting an attribute is no such test (an
Optuna ``set_*_attr`` overwrites), which is why the claim is a name, not a value. A user's study name cannot
hold ``/`` (:func:`autosearch.study.check_study_name`), so no claim name is ever a user's study.

The holder records itself (``owner``, host, process id and PID namespace) on its claim study and refreshes a
``beat`` counter while the analysis runs (:class:`Lease`). A waiting worker takes the claim over by creating the
next generation (again only one can) when the holder released it (an exception, Ctrl-C), when the holder is a
process of this machine that no longer exists, or when its beat has not changed for the lease time on the
waiter's own clock (no clocks compared between machines). A holder that was only slow, not dead, may then finish
too: the analysis is its cached result and ``warm_started`` is written by whichever finishes first.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import optuna

_log = logging.getLogger(__name__)

__all__ = ["Lease", "acquire", "claim_name", "latest_claim", "try_claim"]

_SEP = "/warm-start/"


def claim_name(study_name: str, generation: int) -> str:
    return f"{study_name}{_SEP}{generation}"


def is_claim_name(name: str) -> bool:
    return _SEP in name


def _pidns() -> str | None:
    """This process's PID namespace (Linux), so two containers with one host name do not read each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def latest_claim(stor: optuna.storages.BaseStorage, study_name: str) -> tuple[int, int | None]:
    """(generation, claim study id) of the newest claim; ``(0, None)`` when none was made."""
    gen, cid = 0, None
    while True:
        try:
            nxt = stor.get_study_id_from_name(claim_name(study_name, gen + 1))
        except KeyError:
            return gen, cid
        gen, cid = gen + 1, nxt


def try_claim(stor: optuna.storages.BaseStorage, study_name: str, generation: int, me: str) -> int | None:
    """Make claim ``generation`` (its study id) unless another process made it first (``None``)."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" for a claim
    try:
        cid = stor.create_new_study([optuna.study.StudyDirection.MINIMIZE], claim_name(study_name, generation))
    except optuna.exceptions.DuplicatedStudyError:
        return None
    finally:
        optuna.logging.set_verbosity(level)
    for key, value in (("owner", me), ("host", socket.gethostname()), ("pid", os.getpid()), ("pidns", _pidns()),
                       ("beat", 0), ("claimed_at", time.time())):
        stor.set_study_user_attr(cid, key, value)
    return cid


def _dead_here(attrs: dict[str, Any]) -> bool:
    """The holder is a process of this machine (same host and PID namespace) that no longer runs."""
    pid = attrs.get("pid")
    if attrs.get("host") != socket.gethostname() or attrs.get("pidns") is None or attrs.get("pidns") != _pidns():
        return False
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Lease:
    """A held claim: while open, a thread refreshes its ``beat`` every ``interval`` seconds; leaving the block by
    an exception marks it ``released`` (a waiter takes it over at once)."""

    def __init__(self, stor: optuna.storages.BaseStorage, claim_id: int, generation: int, interval: float) -> None:
        self.stor, self.claim_id, self.generation, self.interval = stor, claim_id, generation, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="autosearch-claim-lease", daemon=True)

    def _beat(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            n += 1
            try:
                self.stor.set_study_user_attr(self.claim_id, "beat", n)
            except Exception as exc:  # noqa: BLE001 - a database hiccup: the next beat tries again (the lease covers several)
                _log.info("claim %s: beat %d not recorded: %s", self.claim_id, n, exc)

    def __enter__(self) -> Lease:  # noqa: PYI034 - final in use; Self needs typing_extensions on Python 3.10
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        done = "released" if kind is not None else "finished"
        try:
            self.stor.set_study_user_attr(self.claim_id, done, time.time())
        except Exception as err:  # noqa: BLE001 - the storage itself failing: the lease then expires
            _log.info("claim %s: %s not recorded: %s", self.claim_id, done, err)


def acquire(stor: optuna.storages.BaseStorage, study_name: str, me: str, *, done: Callable[[], bool],
            say: Callable[[str], None], lease_s: float, beat_s: float, wait_s: float, poll_s: float = 0.5) -> Lease | None:
    """Claim the warm start, or wait for its holder: a :class:`Lease` when this process must run it (it made the
    first claim, or took over one whose holder released it, died on this machine, or let its lease expire);
    ``None`` when ``done()`` (the warm start was recorded) or after ``wait_s`` seconds of waiting."""
    gen, cid = latest_claim(stor, study_name)
    if cid is None:
        won = try_claim(stor, study_name, 1, me)
        if won is not None:
            return Lease(stor, won, 1, beat_s)
        gen, cid = latest_claim(stor, study_name)
    deadline = time.monotonic() + wait_s
    seen: Any = object()
    since = time.monotonic()
    told = False
    while not done():
        g, c = latest_claim(stor, study_name)
        if (g, c) != (gen, cid):
            gen, cid, seen, since = g, c, object(), time.monotonic()
        attrs = stor.get_study_user_attrs(cid) if cid is not None else {}
        owner = attrs.get("owner", "?")
        if not told:
            say(f"[autosearch] worker {me}: the warm start is {owner}'s; waiting for it (at most {wait_s:.0f} s; "
                f"taken over if its lease of {lease_s:.0f} s lapses)")
            told = True
        state = (attrs.get("beat"), owner)
        now = time.monotonic()
        if state != seen:
            seen, since = state, now
        if attrs.get("finished"):
            why = None  # its holder finished: the warm start is being recorded (or was, just now)
        elif attrs.get("released"):
            why = "it released the claim"
        elif _dead_here(attrs):
            why = f"its process {attrs.get('pid')} on this machine is gone"
        elif now - since > lease_s:
            why = f"no beat of its lease for {now - since:.0f} s"
        else:
            why = None
        if why is not None:
            won = try_claim(stor, study_name, gen + 1, me)
            if won is not None:
                say(f"[autosearch] worker {me}: took over the warm start from {owner} ({why})")
                return Lease(stor, won, gen + 1, beat_s)
            continue  # another waiter took it over first: watch the new holder
        if now > deadline:
            say(f"[autosearch] worker {me}: {owner} did not finish the warm start within {wait_s:.0f} s; sampling without it")
            return None
        time.sleep(poll_s)
    return None
