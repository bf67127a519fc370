"""Send a study or an ISMRMRD file to an MRD server as a scanner would (``recon-node submit``, the demo, tests).

:func:`send_study` streams config, header, acquisitions and CLOSE while a second thread reads the reply with the
server's own reader (:mod:`node.ingest.mrd_wire`); :func:`submit_file` turns the reply into an outcome for people
and scripts. What is sent comes from the simulator's stream builder (``pipelines.sim.mrd_writer``), so a study
looks the same on the wire as in a file.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ismrmrd.serialization import ProtocolSerializer

from node.ingest.mrd_wire import Deserializer, SocketStream

if TYPE_CHECKING:
    from pipelines.sim.study import MultiSliceStudy, SimulatedStudy

log = logging.getLogger("recon-node.mrd-client")


def send_study(
    study_or_path: SimulatedStudy | MultiSliceStudy | str | Path,
    host: str,
    port: int,
    config: str | None = "default",
    timeout: float = 30.0,
) -> list[Any]:
    """Stream a study (a simulated one in memory, or an ISMRMRD .h5 file) to an MRD server and return what it
    sends back.

    The reply (images, TEXT messages, ndarrays ...) is read on a second thread while the study is being sent, so a
    server that answers during the stream cannot dead-lock against us. Returns the objects received before the
    server's CLOSE (or a clean end of connection). ``timeout`` bounds connecting, every send, and the server's
    silence after the last byte we sent.

    Raises ``ConnectionError`` when the server is unreachable, drops the connection while we send, or closes it in
    the middle of a message, and ``TimeoutError`` when it does not answer in time; messages name host, port and
    what had been sent and received.
    """
    from pipelines.sim.mrd_writer import config_message, stream_objects, utf8_header

    where = f"MRD server {host}:{port}"
    header, acqs = stream_objects(study_or_path)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectionError(f"cannot connect to {where}: {e}") from e

    received: list[Any] = []
    errors: list[BaseException] = []
    reader = SocketStream(sock, timeout)

    def read_replies() -> None:
        de = Deserializer(reader)
        boundary = 0
        try:
            for obj in de.deserialize():
                received.append(obj)
                boundary = reader.bytes_read
        except EOFError as e:
            if reader.bytes_read == boundary:
                log.warning("%s closed the connection without CLOSE after %d objects", where, len(received))
            else:
                errors.append(ConnectionError(f"{where} closed the connection in the middle of a message ({e})"))
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            errors.append(e)

    thread = threading.Thread(target=read_replies, name=f"mrd-reply-{host}:{port}", daemon=True)
    thread.start()
    n_sent = 0
    out = sock.makefile("wb", buffering=1 << 20)
    try:
        try:
            ser = ProtocolSerializer(out)
            if config is not None:
                ser.serialize(config_message(config))
            ser.serialize(utf8_header(header))
            for acq in acqs:
                ser.serialize(acq)
                n_sent += 1
                reader.sent()
            ser.close()  # CLOSE + flush
            reader.sent()
        except OSError as e:
            # The server may have answered (e.g. an ERR text) before dropping us: give its reply a moment.
            thread.join(timeout=min(timeout, 2.0))
            texts = [o for o in received if isinstance(o, str)]
            raise ConnectionError(
                f"{where} dropped the connection after {n_sent} acquisitions were sent ({e})"
                + (f"; server said: {' | '.join(texts)}" if texts else "")
            ) from e
        # The reader enforces the inactivity timeout itself; this join bound is only a safety net.
        thread.join(timeout=timeout + 5.0)
        if thread.is_alive():
            raise TimeoutError(f"{where} did not finish its reply within {timeout} s of inactivity")
    finally:
        # Stop the reader before its socket goes away, then close both ends of our side.
        reader.cancelled.set()
        thread.join(timeout=1.0)
        for closable in (out, sock):
            try:
                closable.close()
            except OSError:
                pass
    if errors:
        err = errors[0]
        if isinstance(err, TimeoutError):
            raise TimeoutError(
                f"{where} sent no reply within {timeout} s after {n_sent} acquisitions "
                f"({len(received)} objects received)"
            ) from err
        if isinstance(err, ConnectionError):
            raise err
        raise ConnectionError(f"could not read the reply of {where}: {err}") from err
    return received


@dataclass
class SubmitResult:
    texts: list[str] = field(default_factory=list)
    n_images: int = 0
    job_id: str | None = None
    state: str = ""  # queued, done, unrouted, error

    @property
    def exit_code(self) -> int:
        return {"queued": 0, "done": 0, "unrouted": 3}.get(self.state, 1)


def interpret(replies: list[Any]) -> SubmitResult:
    import ismrmrd

    res = SubmitResult()
    for obj in replies:
        if isinstance(obj, ismrmrd.Image):
            res.n_images += 1
        elif isinstance(obj, str):
            res.texts.append(obj)
    for t in res.texts:
        if t.startswith("ERR"):
            res.state = "error"
            return res
        words = t.split()
        if len(words) >= 3 and words[0] == "job":
            res.job_id, res.state = words[1], words[2].rstrip(":")
    if not res.state:
        res.state = "error"
        res.texts.append("ERR the server closed the connection without saying what it did with the data")
    return res


def submit_file(
    path: str | Path, host: str, port: int, config_name: str | None = "default", timeout: float = 60.0
) -> SubmitResult:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (give an ISMRMRD .h5 file)")
    return interpret(send_study(path, host, port, config=config_name, timeout=timeout))
