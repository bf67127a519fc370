"""Quiet-time grouping of received DICOM instances into units.

A *group* is one folder of instances (one study or one series of one source). Every instance stored into a group
pushes its release deadline to ``now + quiet_seconds`` (a sliding window). A group is released when its deadline
has passed **and** no association that stored into it is still open; closing such an association restarts the
window (released at association end + quiet time), so a slow sender that keeps one association open never has
its study cut in two.

The grouper knows nothing of DICOM or of files: it keeps deadlines and calls ``release(group)`` for each due
group. ``release`` is called *with the grouper's lock held*, so that a concurrent :meth:`hold` for the same key
either lands before the release (and postpones it) or creates a new group after it; it must therefore be quick
(rename a folder, queue work) and must not call back into the grouper.

**Restart.** A group found on disk at start-up (its instances were acknowledged before the node stopped) is
re-armed with a window of at least ``restart_grace`` seconds (:meth:`arm`), longer than the usual quiet time: a
sender whose association was cut by the stop needs time to notice, back off and send the rest, and the rest must
land in the *same* group. With only the quiet time, a node that is restarted (or killed again) while senders
back off released the first half as one unit and the resent rest as a second one: one study split into two jobs.

Time is injectable (``clock``) so that tests drive the windows with a fake clock and :meth:`poll`; in service the
:meth:`start` thread polls on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GroupId = tuple[str, str]  # (source name, group key)


@dataclass
class Group:
    """One pending group of instances."""

    source: str
    key: str
    path: Path  # the folder the instances are written to
    quiet_seconds: float
    deadline: float  # clock value after which the group may be released
    n_instances: int = 0  # instances stored since this grouper saw the group (restart: files found on disk)
    open_associations: set[Hashable] = field(default_factory=set)
    info: dict[str, Any] = field(default_factory=dict)  # first association's details (calling AE, peer ...)


@dataclass(frozen=True)
class GroupStatus:
    """What ``recon-node status`` shows for one pending group."""

    source: str
    key: str
    n_instances: int
    seconds_until_release: float | None  # None while an association that stored into it is still open
    open_associations: int


class QuietWindowGrouper:
    """Sliding quiet-time windows, one per (source, key), with holds for open associations."""

    def __init__(
        self,
        release: Callable[[Group], None],
        clock: Callable[[], float] = time.monotonic,
        max_wait: float = 1.0,
        restart_grace: float = 0.0,  # the service passes ``grouping.restart_grace_seconds`` (default 120 s)
    ) -> None:
        self._release = release
        self._clock = clock
        self.restart_grace = float(restart_grace)  # minimum window of a group re-armed after a restart
        self._max_wait = max_wait  # the thread re-checks at least this often (real clock only)
        self._groups: dict[GroupId, Group] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- feeding -------------------------------------------------------------------------------------------------
    def hold(
        self,
        source: str,
        key: str,
        path: Path,
        quiet_seconds: float,
        association: Hashable | None = None,
        info: dict[str, Any] | None = None,
        prepare: Callable[[Path], None] | None = None,
    ) -> Group:
        """Announce that an instance is about to be written into ``(source, key)``; returns its group.

        Creates the group if needed (then ``prepare(path)`` runs under the lock, e.g. to create the folder, so a
        release cannot rename it away in between) and registers ``association`` as open on it. The deadline moves
        only when :meth:`touch` confirms the instance.
        """
        with self._cond:
            gid = (source, key)
            group = self._groups.get(gid)
            if group is None:
                if prepare is not None:
                    prepare(path)
                group = Group(
                    source, key, path, float(quiet_seconds), self._clock() + quiet_seconds, info=dict(info or {})
                )
                self._groups[gid] = group
                log.debug("source=%s group %s opened", source, key)
            if association is not None:
                group.open_associations.add(association)
            self._cond.notify_all()
            return group

    def touch(self, source: str, key: str, count: int = 1) -> None:
        """An instance was stored into the group: slide its window to now + quiet time."""
        with self._cond:
            group = self._groups.get((source, key))
            if group is None:  # released in between (cannot happen while the storing association is open)
                return
            group.n_instances += count
            group.deadline = self._clock() + group.quiet_seconds
            self._cond.notify_all()

    def add(
        self,
        source: str,
        key: str,
        path: Path,
        quiet_seconds: float,
        association: Hashable | None = None,
        info: dict[str, Any] | None = None,
    ) -> Group:
        """:meth:`hold` + :meth:`touch` in one call (an instance already on disk)."""
        group = self.hold(source, key, path, quiet_seconds, association, info)
        self.touch(source, key)
        return group

    def arm(
        self,
        source: str,
        key: str,
        path: Path,
        quiet_seconds: float,
        n_instances: int = 0,
        info: dict[str, Any] | None = None,
        grace: float | None = None,
    ) -> Group:
        """Start a window for a group found on disk (restart): released after ``max(quiet_seconds, grace)`` from
        now (``grace`` defaults to ``restart_grace``). Instances stored meanwhile (a sender resending what the
        stop interrupted) join this same group; after them the usual sliding quiet time applies."""
        window = max(float(quiet_seconds), self.restart_grace if grace is None else float(grace))
        with self._cond:
            group = self._groups.get((source, key))
            if group is None:
                group = Group(source, key, path, float(quiet_seconds), 0.0, info=dict(info or {}))
                self._groups[(source, key)] = group
            group.n_instances = max(group.n_instances, n_instances)
            group.deadline = max(group.deadline, self._clock() + window)
            self._cond.notify_all()
            return group

    def association_closed(self, association: Hashable) -> None:
        """The association ended (released, aborted or dropped): its groups start their quiet time now."""
        with self._cond:
            now = self._clock()
            for group in self._groups.values():
                if association in group.open_associations:
                    group.open_associations.discard(association)
                    group.deadline = max(group.deadline, now + group.quiet_seconds)
            self._cond.notify_all()

    # ---- releasing -----------------------------------------------------------------------------------------------
    def poll(self) -> list[Group]:
        """Release every due group (deadline passed, no open association); returns the released groups."""
        with self._cond:
            now = self._clock()
            due = [g for g in self._groups.values() if not g.open_associations and g.deadline <= now]
            for group in due:
                del self._groups[(group.source, group.key)]
                try:
                    self._release(group)
                except Exception as e:  # a failing release must not stop the other groups or the thread
                    log.error(
                        "source=%s group %s: release failed (%s: %s); the instances stay in %s",
                        group.source,
                        group.key,
                        type(e).__name__,
                        e,
                        group.path,
                        exc_info=True,
                    )
            return due

    def next_deadline(self) -> float | None:
        with self._cond:
            free = [g.deadline for g in self._groups.values() if not g.open_associations]
            return min(free) if free else None

    def pending(self) -> list[GroupStatus]:
        with self._cond:
            now = self._clock()
            return [
                GroupStatus(
                    g.source,
                    g.key,
                    g.n_instances,
                    None if g.open_associations else max(0.0, g.deadline - now),
                    len(g.open_associations),
                )
                for g in sorted(self._groups.values(), key=lambda g: (g.source, g.key))
            ]

    # ---- background thread (real clock) --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="recon-node-grouper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; pending groups stay pending (and on disk)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                nxt = self.next_deadline()
                wait = self._max_wait if nxt is None else min(self._max_wait, max(0.0, nxt - self._clock()))
                if wait > 0:
                    self._cond.wait(timeout=wait)
                if self._stopping:
                    return
            self.poll()
