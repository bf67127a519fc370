"""The sender thread: drains the :class:`~node.egress.outbox.Outbox` to the configured destinations.

Every pass takes the due rows, groups them by destination and hands each group to its destination object
(:mod:`node.egress.destinations`, one module per ``kind``), which yields an outcome per instance: ``sent`` rows are
marked at once (a crash later does not resend them), ``failed`` rows end with their reason (audited), ``retry``
rows go back to pending with exponential backoff (1 s, 2 s, 4 s ... capped at ``backoff_max_s``; with
``max_attempts`` they fail after that many). When the destination itself is down, its other rows wait for the
same backoff instead of each trying on its own. Rows whose file is gone fail here, for every kind.

``verify(name)`` asks the destination for its cheap check (C-ECHO, a write test, a GET) and keeps the result;
``destination_status()`` summarises each destination for ``recon-node status``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node import audit, metrics
from node.egress import destinations as plugins
from node.egress.outbox import FAILED, PENDING, SENDING, SENT, Outbox, OutboxItem

if TYPE_CHECKING:
    from node import config

log = logging.getLogger(__name__)


class Sender(threading.Thread):
    """Drains an :class:`Outbox` to its destinations; see the module docstring."""

    def __init__(
        self,
        outbox: Outbox,
        destinations: Iterable[config.Destination],
        calling_ae: str = "RECONNODE",
        clock: Callable[[], float] | None = None,
        *,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_attempts: int | None = None,
        poll_interval_s: float = 1.0,
        batch_size: int = 1000,
        timeout_s: float = 30.0,
        on_sent: Callable[[set[str]], None] | None = None,
    ) -> None:
        """``destinations``: the site config's entries. ``on_sent(job_ids)`` is called (on the sender thread)
        after a pass delivered rows of those jobs."""
        super().__init__(name="recon-node-sender", daemon=True)
        self.outbox = outbox
        settings = plugins.SendSettings(calling_ae=calling_ae, timeout_s=timeout_s)
        self.destinations: dict[str, plugins.Destination] = {d.name: plugins.create(d, settings) for d in destinations}
        self.calling_ae = calling_ae
        self.clock = clock or outbox.clock
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_attempts = max_attempts
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.on_sent = on_sent
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self._delivered: set[str] = set()

    # ---- thread ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("sender started (calling AE %s, destinations %s)", self.calling_ae, ", ".join(self.destinations))
        while not self._stop_event.is_set():
            try:
                self.send_due()
            except Exception:  # never let the thread die: the outbox keeps the work
                log.exception("sender pass failed; retrying in %.1f s", self.poll_interval_s)
            self._wake.wait(self._sleep_s())
            self._wake.clear()
        log.info("sender stopped")

    def _sleep_s(self) -> float:
        nxt = self.outbox.next_due_at()
        if nxt is None:
            return self.poll_interval_s
        return min(self.poll_interval_s, max(0.0, nxt - self.clock()))

    def wake(self) -> None:
        """Look at the outbox now (call after enqueue)."""
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop_event.set()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    # ---- one pass ----------------------------------------------------------------------------------------------
    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones: base * 2**(attempts-1), capped."""
        return min(self.backoff_base_s * 2 ** max(attempts - 1, 0), self.backoff_max_s)

    def send_due(self) -> int:
        """Send every due row once; returns how many were sent."""
        items = self.outbox.due(self.clock(), limit=self.batch_size)
        groups: dict[str, list[OutboxItem]] = {}
        for it in items:
            groups.setdefault(it.destination, []).append(it)
        sent = 0
        for name, group in groups.items():
            dest = self.destinations.get(name)
            if dest is None:
                for it in group:
                    self.outbox.mark_failed(
                        it.id,
                        f"destination {name!r} is not configured (configured: "
                        f"{', '.join(self.destinations) or 'none'}); add it to the "
                        "site config and queue the job again",
                    )
                continue
            present = []
            for it in group:
                if Path(it.path).is_file():
                    present.append(it)
                else:
                    self.outbox.mark_failed(it.id, f"job {it.job_id}: file {it.path} no longer exists")
            if present:
                sent += self._send(dest, present)
        delivered, self._delivered = self._delivered, set()
        if delivered and self.on_sent is not None:
            try:
                self.on_sent(delivered)
            except Exception:  # noqa: BLE001 - a status callback must not stop the sender
                log.exception("sender: on_sent callback failed")
        return sent

    def _send(self, dest: plugins.Destination, items: list[OutboxItem]) -> int:
        """Hand ``items`` to ``dest`` and record each outcome; returns how many were sent."""
        self.outbox.mark_sending(it.id for it in items)
        handled: set[int] = set()
        retries: dict[tuple[str, bool], list[OutboxItem]] = {}  # (error, destination down) -> rows
        sent = 0
        try:
            for out in dest.send(items):
                it = out.item
                handled.add(it.id)
                if out.state == "sent":
                    self.outbox.mark_sent(it.id)
                    self._delivered.add(it.job_id)
                    audit.event(
                        "egress.delivered",
                        destination=dest.name,
                        target=dest.target,
                        job_id=it.job_id,
                        sop_uid=it.sop_instance_uid,
                        **dest.audit,
                    )
                    sent += 1
                    metrics.INSTANCES_SENT.labels(dest.name).inc()
                elif out.state == "failed":
                    log.error("destination %s (%s): %s", dest.name, dest.target, out.error)
                    self.outbox.mark_failed(it.id, out.error or "refused by the destination")
                else:
                    retries.setdefault((out.error or "failed", out.destination_down), []).append(it)
        except Exception as e:  # a destination's bug must not leave its rows "sending" until the next start
            log.exception("destination %s: sending failed", dest.name)
            rest = [it for it in items if it.id not in handled]
            handled.update(it.id for it in rest)
            retries.setdefault((f"{type(e).__name__}: {e}", True), []).extend(rest)
        finally:
            untouched = [it.id for it in items if it.id not in handled]
            if untouched:
                self.outbox.mark_pending(untouched)
        for (error, down), rows in retries.items():
            self._retry(dest, rows, error, whole_destination=down)
        if sent:
            self.outbox.note_destination(dest.name, success=True)
            log.info("destination %s (%s): %d instance(s) delivered", dest.name, dest.target, sent)
        return sent

    def _retry(
        self, dest: plugins.Destination, items: Sequence[OutboxItem], error: str, *, whole_destination: bool = False
    ) -> None:
        """Back off ``items``; ``whole_destination``: the destination itself failed, so hold its other rows too."""
        longest = 0.0
        for it in items:
            attempts = it.attempts + 1
            if self.max_attempts is not None and attempts >= self.max_attempts:
                self.outbox.mark_failed(it.id, f"{error} (gave up after {attempts} attempts)")
            else:
                longest = max(longest, self.backoff(attempts))
                self.outbox.mark_retry(it.id, error, self.backoff(attempts))
                metrics.INSTANCES_RETRIED.labels(dest.name).inc()
        if whole_destination and longest:
            self.outbox.defer(dest.name, self.clock() + longest)
        self.outbox.note_destination(dest.name, error=error)
        log.warning(
            "destination %s (%s): %s; %d instance(s) will be retried", dest.name, dest.target, error, len(items)
        )

    # ---- status ------------------------------------------------------------------------------------------------
    def verify(self, destination: str) -> bool:
        """The destination's reachability check; the result is kept for :meth:`destination_status`."""
        dest = self.destinations.get(destination)
        if dest is None:
            raise ValueError(
                f"destination {destination!r} is not configured (configured: {', '.join(self.destinations) or 'none'})"
            )
        try:
            error = dest.verify()
        except Exception as e:  # noqa: BLE001 - a failing check is an answer, not a crash
            error = f"check failed: {type(e).__name__}: {e}"
        self.outbox.note_destination(dest.name, echo_ok=error is None, error=error)
        (log.info if error is None else log.warning)(
            "destination %s (%s %s): %s", dest.name, dest.kind, dest.target, "reachable" if error is None else error
        )
        return error is None

    def destination_status(self) -> list[dict[str, Any]]:
        """Per destination: name, kind, target, pending, sent, failed, last_error, last_success_at, echo_ok."""
        counts = self.outbox.counts()
        rows = self.outbox.destination_rows()
        out = []
        for name in list(self.destinations) + sorted(set(counts) - set(self.destinations)):
            c, r = counts.get(name, {}), rows.get(name, {})
            echo = r.get("echo_ok")
            dest = self.destinations.get(name)
            out.append(
                {
                    "name": name,
                    "kind": dest.kind if dest else "unknown",
                    "target": dest.target if dest else "(not configured)",
                    "pending": c.get(PENDING, 0) + c.get(SENDING, 0),
                    "sent": c.get(SENT, 0),
                    "failed": c.get(FAILED, 0),
                    "last_error": r.get("last_error"),
                    "last_success_at": r.get("last_success_at"),
                    "echo_ok": None if echo is None else bool(echo),
                }
            )
        return out
