"""Socket options for the node's DICOM associations (pynetdicom sockets have no option for them)."""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger("recon-node.tcp")


def no_delay(assoc: Any) -> None:
    """Turn Nagle's algorithm off on an association's socket.

    pynetdicom writes a C-STORE's command set and its data set as separate P-DATA PDUs; with Nagle on, the second
    small write waits for the peer's delayed ACK (40 ms on Linux), which capped a 1000-frame MR series at ~15
    instances/s on loopback. DCMTK does the same for its peers when TCP_NODELAY is set.
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as e:  # a socket already closed by the peer: nothing to speed up
        log.debug("TCP_NODELAY not set: %s", e)
