"""Destination plug-ins: one module per ``kind`` of the site config's destinations, found by that name.

A kind is a module ``node.egress.destinations.<kind>`` whose ``DESTINATION`` is a class built as
``DESTINATION(cfg, settings)`` from its config model (one member of :data:`node.config.Destination`) and
implementing :class:`Destination`. The sender (:mod:`node.egress.sender`) owns scheduling, backoff, the outbox
rows and the audit; a destination only delivers what it is handed and says, per instance, how it went.

Adding a kind: a module here plus a config model in the union of :mod:`node.config`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from node.egress.outbox import OutboxItem

if TYPE_CHECKING:
    from node import config


@dataclass(frozen=True)
class SendSettings:
    """What every destination of one sender shares (from the site config's ``node`` and ``egress`` blocks)."""

    calling_ae: str = "RECONNODE"  # our AE title (DICOM kinds)
    timeout_s: float = 30.0  # network timeout per connection / request, unless the destination sets its own


State = Literal["sent", "retry", "failed"]


@dataclass(frozen=True)
class Outcome:
    """How one instance went: ``sent``; ``retry`` (back off and try again); ``failed`` (never will succeed).

    ``destination_down``: the destination itself failed (unreachable, refused, 5xx), so the sender holds all its
    other rows too instead of trying each one.
    """

    item: OutboxItem
    state: State
    error: str | None = None
    destination_down: bool = False


class Destination(Protocol):
    """One configured destination, built from its config model by :func:`create`."""

    kind: str  # the config's ``kind`` (status shows it)
    name: str
    target: str  # where, for people: AE@host:port, a folder, a URL
    audit: Mapping[str, Any]  # extra fields of this destination's ``egress.delivered`` audit records

    def verify(self) -> str | None:
        """A cheap reachability check (C-ECHO, a write test, a GET): None when fine, else why not."""
        ...

    def send(self, items: Sequence[OutboxItem]) -> Iterator[Outcome]:
        """Deliver ``items`` (their files exist), yielding each outcome as soon as it is known.

        Items with no outcome (e.g. more SOP classes than one association carries) go back to pending as they
        were and come again in the next pass."""
        ...


def create(cfg: config.Destination, settings: SendSettings) -> Destination:
    """The destination object of a config entry, from the module named after its kind."""
    try:
        module = importlib.import_module(f"{__name__}.{cfg.kind}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{cfg.kind}":  # the kind's module exists but lacks one of its imports
            raise
        raise ValueError(
            f"destination {cfg.name!r}: no destination kind {cfg.kind!r} (no module {__name__}.{cfg.kind})"
        ) from None
    destination: Destination = module.DESTINATION(cfg, settings)
    return destination
