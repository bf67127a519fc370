"""Reading the MRD streaming protocol from a socket: one reader for the node's server and its client.

:class:`SocketStream` is the ``read(n)`` file that ismrmrd's ``ProtocolDeserializer`` reads from, over a plain or
TLS socket; :class:`Deserializer` is the deserializer both sides use. The server (:mod:`node.ingest.mrd_server`)
reads a scanner's stream with every bound set; the client (:mod:`node.ingest.mrd_client`) reads a server's reply
on a second thread while it sends, so its silence is counted from the last byte either way and it can be
cancelled.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import ismrmrd.xsd as x
from ismrmrd.hdf5 import acquisition_header_dtype
from ismrmrd.serialization import ProtocolDeserializer

_ACQUISITION_ID = 1008
_ACQ_HEADER_SIZE = acquisition_header_dtype.itemsize  # 340
_ACQ_FIELD = {
    k: acquisition_header_dtype.fields[k][1] for k in ("number_of_samples", "active_channels", "trajectory_dimensions")
}
_POLL_S = 0.1  # how often a waiting reader looks at its cancel flag and deadline
_RECV_BYTES = 1 << 16  # read ahead: the small fields of a message (id, header) cost no system call each


class StreamError(Exception):
    """A stream the node will not accept; the server sends the message to the peer after ``ERR ``."""


class MessageTooLarge(Exception):
    """A message (or an acquisition's declared size) over the per-message bound."""


class StreamLimit(Exception):
    """A configured bound of one stream was reached (size, duration, texts, free disk); the message says which."""


class SocketStream:
    """``read(n)`` over a socket for the deserializer: idle timeout, optional bounds, EOF flag, cancellation.

    Silence is counted from the latest of: the start of the current read, the last byte received and the last
    byte the caller reports as sent (:meth:`sent`), so a peer may stay quiet while we are still talking to it. The
    optional bounds keep a hostile peer from holding a thread, memory or disk without limit: the size of one
    message field (``max_bytes``, also checked against an acquisition header's declared sizes before ismrmrd
    allocates arrays from them), total bytes (``max_total``), wall time (``max_seconds``, which drops a trickle
    sender that the idle timeout alone never would) and, every ``disk_check_bytes``, ``disk_problem()`` (a
    sentence when the spool's free space fell below its reserve). The socket's own timeout, if any, is left as
    it is: another thread may be sending on it.
    """

    def __init__(
        self,
        sock: socket.socket,
        idle_timeout: float,
        max_bytes: int | None = None,
        max_total: int | None = None,
        max_seconds: float | None = None,
        disk_check_bytes: int | None = None,
        disk_problem: Callable[[], str | None] | None = None,
    ) -> None:
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.max_bytes = max_bytes
        self.max_total = max_total
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds if max_seconds else None
        self.disk_check_bytes = disk_check_bytes
        self.disk_problem = disk_problem
        self._next_disk_check = disk_check_bytes or 0
        self.bytes_read = 0
        self.eof = False
        self.cancelled = threading.Event()
        self._buf = bytearray()
        self._last = time.monotonic()
        self._last_sent = 0.0
        self._last_id: int | None = None
        self._poll = select.poll()  # no FD_SETSIZE limit, unlike select()
        self._poll.register(sock, select.POLLIN | select.POLLPRI)

    def sent(self) -> None:
        """The caller just sent bytes to the peer: its silence counts from now."""
        self._last_sent = time.monotonic()

    def _wait(self) -> None:
        """Block until the socket has data (or EOF); raise when cancelled, idle too long or past the deadline."""
        while True:
            if self.cancelled.is_set():
                raise ConnectionAbortedError("reading cancelled")
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                raise StreamLimit(f"the stream did not end within node.mrd_max_stream_s ({self.max_seconds:g} s)")
            idle_left = self.idle_timeout - (now - max(self._last, self._last_sent))
            if idle_left <= 0:
                raise TimeoutError(f"no data for {self.idle_timeout:g} s")
            if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                return  # decrypted bytes already inside the TLS layer: poll() cannot see them
            wait = min(_POLL_S, idle_left, self.deadline - now if self.deadline is not None else _POLL_S)
            if self._poll.poll(max(1, int(wait * 1000))):
                return

    def read(self, n: int) -> bytes:
        n = int(n)
        if self.max_bytes is not None and n > self.max_bytes:
            raise MessageTooLarge(
                f"a message field of {n} bytes exceeds node.mrd_max_message_mb ({self.max_bytes >> 20} MB); "
                "the stream is malformed or the limit too low"
            )
        if self.max_total is not None and self.bytes_read + n > self.max_total:
            raise StreamLimit(f"the stream exceeds node.mrd_max_stream_mb ({self.max_total >> 20} MB)")
        self._last = max(self._last, time.monotonic())
        while len(self._buf) < n and not self.eof:
            self._wait()
            try:
                chunk = self.sock.recv(max(_RECV_BYTES, min(n - len(self._buf), 1 << 20)))
            except TimeoutError:  # TLS: a record began but did not complete within the socket's timeout
                raise TimeoutError(f"no data for {self.idle_timeout:g} s") from None
            if not chunk:
                self.eof = True  # EOF: return short, as a file would; the deserializer raises EOFError
                break
            self._buf += chunk
            self._last = time.monotonic()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self.bytes_read += len(data)
        if self.disk_problem is not None and self.disk_check_bytes and self.bytes_read >= self._next_disk_check:
            self._next_disk_check = self.bytes_read + self.disk_check_bytes
            problem = self.disk_problem()
            if problem:
                raise StreamLimit(problem)
        if self.max_bytes is not None:
            self._guard(n, data)
        return data

    def _guard(self, n: int, data: bytes) -> None:
        """Check an acquisition header's sizes before ismrmrd allocates arrays from them (absurd lengths)."""
        if n == 2 and len(data) == 2:
            self._last_id = struct.unpack("<H", data)[0]
            return
        if self._last_id == _ACQUISITION_ID and n == _ACQ_HEADER_SIZE and len(data) == n:
            samples, channels, dims = (
                struct.unpack_from("<H", data, _ACQ_FIELD[k])[0]
                for k in ("number_of_samples", "active_channels", "trajectory_dimensions")
            )
            size = samples * (channels * 8 + dims * 4)
            if self.max_bytes is not None and size > self.max_bytes:
                raise MessageTooLarge(
                    f"an acquisition of {samples} samples x {channels} channels ({size >> 20} MB) exceeds "
                    f"node.mrd_max_message_mb ({self.max_bytes >> 20} MB); the stream is malformed or the limit "
                    "too low"
                )
        self._last_id = None


_DECL = re.compile(rb"^\s*<\?xml[^>]*\?>")


def header_text(raw: bytes) -> str:
    """The header as UTF-8 text with a declaration that says so (ismrmrd 1.15 declares ascii but sends UTF-8)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    m = _DECL.match(text.encode("utf-8"))
    if m:
        text = '<?xml version="1.0" encoding="UTF-8"?>' + text.encode("utf-8")[m.end() :].decode("utf-8")
    return text


class Deserializer(ProtocolDeserializer):
    """ProtocolDeserializer that keeps the header's XML text as sent and tolerates a wrong encoding declaration.

    Text messages (TEXT, CONFIG_TEXT) are bounded in number and size before they are read (``max_texts``,
    ``max_text_bytes``). Texts and the XML header lose everything from the first NUL on: python-ismrmrd-server's
    reference client (``connection.py``, the FIRE / OpenRecon peer) NUL-terminates them, and that server
    strips the same way (``.split('\\x00', 1)[0]``).
    """

    header_text: str | None = None

    def __init__(self, stream: Any, max_texts: int | None = None, max_text_bytes: int | None = None) -> None:
        super().__init__(stream)
        self.max_texts = max_texts
        self.max_text_bytes = max_text_bytes
        self.n_texts = 0

    def _deserialize_ismrmrd_header(self) -> x.ismrmrdHeader:
        length_bytes = self._stream.read(4)
        if len(length_bytes) < 4:
            raise EOFError("Incomplete header length")
        length = struct.unpack("<I", length_bytes)[0]
        raw = self._stream.read(length)
        if len(raw) < length:
            raise EOFError("Incomplete ISMRMRD header")
        text = header_text(raw.split(b"\x00", 1)[0])
        try:
            header = x.CreateFromDocument(text.encode("utf-8"))
        except Exception as e:  # noqa: BLE001 - xsdata parser errors
            raise StreamError(
                f"the ISMRMRD header is not valid ISMRMRD XML ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        self.header_text = text
        return header

    def _deserialize_text(self) -> str:
        self.n_texts += 1
        if self.max_texts is not None and self.n_texts > self.max_texts:
            raise StreamLimit(f"more than node.mrd_max_text_messages ({self.max_texts}) text messages")
        length_bytes = self._stream.read(4)
        if len(length_bytes) < 4:
            raise EOFError("Incomplete text length")
        length = struct.unpack("<I", length_bytes)[0]
        if self.max_text_bytes is not None and length > self.max_text_bytes:
            raise StreamLimit(
                f"a text message of {length} bytes exceeds node.mrd_max_text_kb ({self.max_text_bytes >> 10} KB)"
            )
        raw = self._stream.read(length)
        if len(raw) < length:
            raise EOFError("Incomplete text data")
        return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
