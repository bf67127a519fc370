"""MRD (ISMRMRD streaming protocol v1) server: one thread per scanner connection, stream -> spool -> job.

A connection is one unit: [config file | config text] header [text/JSON] acquisitions [waveforms, images] CLOSE.
Framing is ismrmrd's ``ProtocolDeserializer`` / ``ProtocolSerializer``; the reader under it
(:mod:`node.ingest.mrd_wire`, shared with the client) enforces an idle timeout and the stream's bounds, so a
stalled or malformed peer never hangs a thread or exhausts memory.
Acquisitions are appended to an ISMRMRD HDF5 file in ``<spool>/tmp`` in blocks (bounded memory), fsynced and
renamed to ``<spool>/units/<unit id>.h5`` (with its sidecar, :func:`node.ingest.units.save_sidecar`); only then
is the unit handed to the service, which routes it and creates its job, and the scanner answered with TEXT
``job <id> queued`` (or ``job <id> unrouted: ...``) and CLOSE. Anything wrong is answered with TEXT
``ERR <reason>`` and CLOSE, creates no job, and leaves no file behind.

Routes with ``reply_over_mrd: true`` run the pipeline on the connection's thread (the service does, inside the
handler call) and send the outputs back as
MRD images (magnitude, ``image_series_index`` per output kind, meta attributes ``recon_node_kind``,
``recon_node_unit``, ``recon_node_job``) before ``job <id> done`` and CLOSE.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import ismrmrd.xsd as x
import numpy as np
from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype, waveform_dtype, waveform_header_dtype
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolSerializer

from node import audit, metrics
from node.config import SiteConfig, find_source, spool_space_problem
from node.durable import fsync_dir
from node.ingest import attributes
from node.ingest.mrd_wire import Deserializer, MessageTooLarge, SocketStream, StreamError, StreamLimit, header_text
from node.ingest.units import IngestUnit, UnitHandler, save_sidecar, sidecar_path

log = logging.getLogger("recon-node.mrd")

_BLOCK_BYTES = 16 << 20  # acquisitions buffered before one HDF5 append


class _UnitWriter:
    """An ISMRMRD HDF5 file (group ``dataset``) written as the stream arrives, in blocks of acquisitions."""

    def __init__(self, path: Path, xml: str) -> None:
        self.path = path
        self.f = h5py.File(path, "w")
        self.grp = self.f.create_group("dataset")
        xml_ds = self.grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xml_ds[0] = xml.encode("utf-8")
        self._acqs: list[ismrmrd.Acquisition] = []
        self._bytes = 0
        self.n_acquisitions = 0
        self.n_waveforms = 0

    def acquisition(self, acq: ismrmrd.Acquisition) -> None:
        self._acqs.append(acq)
        self._bytes += acq.data.nbytes + acq.traj.nbytes + 340
        self.n_acquisitions += 1
        if self._bytes >= _BLOCK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._acqs:
            return
        n = len(self._acqs)
        rows = np.empty(n, dtype=acquisition_dtype)
        rows["head"] = np.frombuffer(b"".join(bytes(a.getHead()) for a in self._acqs), dtype=acquisition_header_dtype)
        for i, a in enumerate(self._acqs):
            rows[i]["data"] = a.data.view(np.float32).reshape(-1)
            rows[i]["traj"] = a.traj.astype(np.float32, copy=False).reshape(-1)
        if "data" not in self.grp:
            self.grp.create_dataset("data", data=rows, maxshape=(None,), chunks=(max(1, min(n, 1024)),))
        else:
            ds = self.grp["data"]
            start = ds.shape[0]
            ds.resize(start + n, axis=0)
            ds[start:] = rows
        self._acqs.clear()
        self._bytes = 0

    def waveform(self, wav: ismrmrd.Waveform) -> None:
        row = np.empty(1, dtype=waveform_dtype)
        row[0]["head"] = np.frombuffer(wav.getHead(), dtype=waveform_header_dtype)
        row[0]["data"] = wav.data.view(np.uint32).reshape(-1)
        if "waveforms" not in self.grp:
            self.grp.create_dataset("waveforms", data=row, maxshape=(None,), chunks=(64,))
        else:
            ds = self.grp["waveforms"]
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = row[0]
        self.n_waveforms += 1

    def close(self) -> None:
        self.flush()
        self.f.flush()
        self.f.close()
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())

    def abort(self) -> None:
        try:
            self.f.close()
        except Exception:  # noqa: BLE001
            pass


def images_for_outputs(outputs: list[Any], job_id: str) -> list[ismrmrd.Image]:
    """Pipeline outputs as MRD magnitude images: one image per slice / frame, one series index per output."""
    images = []
    for series, out in enumerate(outputs, start=1):
        data = np.asarray(out.data)
        data = (np.abs(data) if np.iscomplexobj(data) else data).astype(np.float32)
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        if data.ndim == 2:
            data = data[None]
        unit = getattr(out, "unit", "1")
        geom = out.geometry
        fov = (
            float(geom.pixel_spacing_mm[1] * data.shape[2]),
            float(geom.pixel_spacing_mm[0] * data.shape[1]),
            float(geom.slice_thickness_mm),
        )
        for i in range(data.shape[0]):
            img = ismrmrd.Image.from_array(np.ascontiguousarray(data[i]), transpose=False)
            img.image_type = ismrmrd.IMTYPE_MAGNITUDE
            img.image_series_index = series
            img.image_index = i + 1
            img.field_of_view = fov
            meta = ismrmrd.Meta(
                {
                    "DataRole": "Quantitative" if unit not in ("1", "") else "Image",
                    "recon_node_kind": out.kind,
                    "recon_node_unit": unit,
                    "recon_node_job": job_id,
                    "SeriesDescription": f"{out.description} [{unit}]",
                    "ImageRowDir": list(geom.orientation[:3]),
                    "ImageColumnDir": list(geom.orientation[3:]),
                }
            )
            img.attribute_string = meta.serialize()
            images.append(img)
    return images


class MRDServer:
    """Listens on ``cfg.node.bind:cfg.node.mrd_port``; ``start()`` returns once listening (``.port`` is the port).

    With ``tls_context`` it serves MRD over TLS instead (``node.mrd_tls_port``, the certificate settings of
    ``node.tls``); the handshake runs on the connection's thread, bounded by the idle timeout. ``slots`` bounds the
    concurrent connections (shared by the plain and the TLS listener); a connection beyond it is answered ``ERR``
    at once and closed, so idle peers cannot pile up threads.
    """

    def __init__(
        self,
        cfg: SiteConfig,
        handler: UnitHandler,
        tls_context: ssl.SSLContext | None = None,
        port: int | None = None,
        slots: threading.BoundedSemaphore | None = None,
    ) -> None:
        self.cfg = cfg
        self.handler = handler
        self.tls_context = tls_context
        self.port = cfg.node.mrd_port if port is None else port
        self.slots = slots or threading.BoundedSemaphore(cfg.node.mrd_max_connections)
        self.name = "MRD over TLS" if tls_context is not None else "MRD"
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.refused_busy = 0  # connections refused because every slot was taken (for tests and status)

    def start(self) -> MRDServer:
        for d in (self.cfg.node.units_dir, self.cfg.node.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        family = socket.AF_INET6 if ":" in self.cfg.node.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        key = "node.mrd_tls_port" if self.tls_context is not None else "node.mrd_port"
        try:
            sock.bind((self.cfg.node.bind, self.port))
        except OSError as e:
            sock.close()
            raise OSError(
                f"{self.name} server cannot listen on {self.cfg.node.bind}:{self.port} ({e.strerror}); "
                f"another program uses the port - change {key} or stop it"
            ) from None
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"mrd-accept-{self.port}", daemon=True)
        self._thread.start()
        log.info(
            "%s server listening on %s:%d (at most %d connections)",
            self.name,
            self.cfg.node.bind,
            self.port,
            self.cfg.node.mrd_max_connections,
        )
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2.0)
        if self._sock:
            self._sock.close()
        deadline = time.monotonic() + timeout
        with self._lock:
            conns = list(self._conns)
        for t in conns:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            if not self.slots.acquire(blocking=False):
                self._refuse_busy(conn, addr[0])
                continue
            t = threading.Thread(target=self._serve, args=(conn, addr[0]), name=f"mrd-{addr[0]}:{addr[1]}", daemon=True)
            with self._lock:
                self._conns.add(t)
            try:
                t.start()
            except BaseException:
                with self._lock:
                    self._conns.discard(t)
                self.slots.release()
                conn.close()
                raise

    def _refuse_busy(self, conn: socket.socket, peer: str) -> None:
        """Every slot is taken: answer ERR + CLOSE on the accept thread (a few bytes, bounded send) and close."""
        self.refused_busy += 1
        metrics.UNITS_REJECTED.labels("mrd", "busy").inc()
        limit = self.cfg.node.mrd_max_connections
        log.warning(
            "%s connection from %s refused: %d connections already open (node.mrd_max_connections)",
            self.name,
            peer,
            limit,
        )
        audit.event(
            "mrd.connection.refused",
            outcome="refused",
            actor_ip=peer,
            port=self.port,
            reason=f"node.mrd_max_connections ({limit}) reached",
        )
        if self.tls_context is not None:
            conn.close()  # an answer would need a TLS handshake on the accept thread; closing is the answer
            return
        try:
            conn.settimeout(2.0)
            buf = io.BytesIO()
            ser = ProtocolSerializer(buf)
            ser.serialize(
                f"ERR the node is busy: {limit} MRD connections are open (node.mrd_max_connections); send again later"
            )
            ser.close()
            conn.sendall(buf.getvalue())
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()

    # ---- one connection ------------------------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            if self.tls_context is not None:
                try:
                    sock.settimeout(self.cfg.node.mrd_idle_timeout_s)
                    sock = self.tls_context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    log.warning("%s connection from %s refused: TLS handshake failed (%s)", self.name, peer, e)
                    audit.event(
                        "mrd.connection.refused",
                        outcome="refused",
                        actor_ip=peer,
                        port=self.port,
                        reason=f"TLS handshake failed: {str(e)[:120]}",
                    )
                    sock.close()
                    return
            out = sock.makefile("wb")
            ser = ProtocolSerializer(out)
            try:
                self._serve_inner(sock, peer, ser, out)
            except Exception as e:  # noqa: BLE001 - one connection never takes the server down
                log.exception("MRD connection from %s: unexpected error: %s", peer, e)
                self._answer(
                    sock, ser, out, f"ERR internal error in the node ({type(e).__name__}: {e}); see the node log"
                )
            finally:
                for closable in (out, sock):
                    try:
                        closable.close()
                    except OSError:
                        pass
        finally:
            with self._lock:
                self._conns.discard(threading.current_thread())
            self.slots.release()

    def _reply(self, ser: ProtocolSerializer, out: Any, *texts: str, images: Sequence[ismrmrd.Image] = ()) -> None:
        """Send images, texts and CLOSE; a peer that already left is not an error."""
        try:
            for img in images:
                ser.serialize(img)
            for t in texts:
                ser.serialize(t)
            ser.close()
            out.flush()
        except (OSError, ValueError) as e:
            log.info("could not send the reply (%s): %s", " | ".join(texts), e)

    def _refuse(
        self,
        sock: socket.socket,
        ser: ProtocolSerializer,
        out: Any,
        text: str,
        linger_s: float = 1.0,
        linger_bytes: int = 1 << 20,
    ) -> None:
        """Answer ERR + CLOSE, then linger (see :meth:`_answer`)."""
        self._answer(sock, ser, out, text, linger_s=linger_s, linger_bytes=linger_bytes)

    def _answer(
        self,
        sock: socket.socket,
        ser: ProtocolSerializer,
        out: Any,
        *texts: str,
        images: Sequence[ismrmrd.Image] = (),
        linger_s: float = 1.0,
        linger_bytes: int = 1 << 20,
    ) -> None:
        """Answer (images, texts, CLOSE), then discard (never parse) what the peer still sends for a moment, so
        that closing with unread data (e.g. bytes after the peer's CLOSE) does not reset the connection before
        the peer has read the answer."""
        self._reply(ser, out, *texts, images=images)
        try:
            # A TLS socket cannot half-close (shutdown would end the TLS session before the peer reads the answer).
            if not isinstance(sock, ssl.SSLSocket):
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(linger_s)
            drained, deadline = 0, time.monotonic() + linger_s
            while time.monotonic() < deadline and drained < linger_bytes:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except (OSError, ValueError):
            pass

    def _serve_inner(self, sock: socket.socket, peer: str, ser: ProtocolSerializer, out: Any) -> None:
        cfg = self.cfg
        src = find_source(cfg, "mrd", peer, None)
        if src is None and cfg.reject_unknown_sources:
            log.warning("MRD connection from %s refused: no source with protocol mrd lists this host", peer)
            metrics.UNITS_REJECTED.labels("mrd", "unknown_source").inc()
            audit.event(
                "mrd.connection.refused", outcome="refused", actor_ip=peer, port=self.port, reason="unknown source"
            )
            self._refuse(
                sock,
                ser,
                out,
                f"ERR unknown source {peer}: this host is not a configured MRD source "
                "of this node (ask the node's administrator to add it under sources)",
            )
            return
        source = src.name if src else "unknown"
        problem = spool_space_problem(cfg)
        if problem:
            log.error("MRD connection from %s [%s] refused: %s", peer, source, problem)
            metrics.UNITS_REJECTED.labels("mrd", "disk_full").inc()
            audit.event(
                "mrd.connection.refused",
                outcome="refused",
                actor_ip=peer,
                source=source,
                port=self.port,
                reason="spool disk full",
            )
            self._refuse(sock, ser, out, f"ERR {problem}")
            return
        audit.event(
            "mrd.connection.accepted", actor_ip=peer, source=source, port=self.port, tls=self.tls_context is not None
        )
        try:
            unit = self._receive(sock, peer, source)
        except StreamError as e:
            if str(e) == "":  # a connect-and-close probe (health check): nothing to answer
                log.debug("MRD connection from %s [%s] closed without data", peer, source)
                return
            log.warning("MRD stream from %s [%s] rejected: %s", peer, source, e)
            metrics.UNITS_REJECTED.labels("mrd", "invalid").inc()
            audit.event("mrd.stream.rejected", outcome="failure", actor_ip=peer, source=source, reason=str(e)[:200])
            self._refuse(sock, ser, out, f"ERR {e}", linger_s=2.0, linger_bytes=256 << 20)
            return
        audit.event(
            "unit.stored",
            actor_ip=peer,
            source=source,
            unit=unit.path.name,
            unit_kind="mrd",
            n_objects=unit.n_objects,
            study_uid=unit.attributes.get("studyInstanceUID"),
        )
        try:
            admission = self.handler(unit)
        except Exception as e:  # noqa: BLE001
            log.exception("MRD unit %s from %s [%s]: could not create its job", unit.path.name, peer, source)
            self._answer(
                sock,
                ser,
                out,
                f"ERR the data was stored as {unit.path.name} but its job could not be "
                f"created ({type(e).__name__}: {e}); it will be picked up when the node "
                "restarts",
            )
            return
        job_id, result = admission.job_id, admission.result
        if result is not None:  # a reply_over_mrd route: the job ran while the scanner waited
            if result.ok:
                images = images_for_outputs(result.outputs, job_id)
                log.info("job %s [%s]: sending %d images back over MRD to %s", job_id, source, len(images), peer)
                self._answer(sock, ser, out, f"job {job_id} done", images=images)
            else:
                self._answer(sock, ser, out, f"ERR job {job_id} {result.state}: {result.error}")
        elif admission.route is None:
            said = ", ".join(f"{k}={v}" for k, v in unit.attributes.items() if k != "json")
            self._answer(
                sock,
                ser,
                out,
                f"job {job_id} unrouted: no route of this node matches this scan ({said}); the data is kept",
            )
        else:
            self._answer(sock, ser, out, f"job {job_id} queued")

    def _receive(self, sock: socket.socket, peer: str, source: str) -> IngestUnit:
        cfg = self.cfg
        n = cfg.node
        unit_id = f"mrd-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        tmp = n.tmp_dir / f"{unit_id}.h5.partial"
        sock.settimeout(n.mrd_idle_timeout_s)  # bounds a TLS record that starts but never completes
        stream = SocketStream(
            sock,
            n.mrd_idle_timeout_s,
            n.mrd_max_message_mb << 20,
            max_total=n.mrd_max_stream_mb << 20,
            max_seconds=n.mrd_max_stream_s,
            disk_check_bytes=n.mrd_disk_check_mb << 20,
            disk_problem=lambda: spool_space_problem(cfg),
        )
        de = Deserializer(stream, max_texts=n.mrd_max_text_messages, max_text_bytes=n.mrd_max_text_kb << 10)
        writer: _UnitWriter | None = None
        header: x.ismrmrdHeader | None = None
        attrs: dict[str, str] = {}
        config = ""
        json_text: str | None = None  # the first JSON text (configAdditional); other texts are counted, not kept
        n_images = n_arrays = 0
        t0 = time.monotonic()

        def count() -> str:
            return f"after {writer.n_acquisitions if writer else 0} acquisitions"

        try:
            try:
                for obj in de.deserialize():
                    if isinstance(obj, ismrmrd.Acquisition):
                        if writer is None:
                            raise StreamError(
                                "an acquisition arrived before the ISMRMRD header; send the header (message 3) first"
                            )
                        writer.acquisition(obj)
                    elif isinstance(obj, x.ismrmrdHeader):
                        if header is None:
                            try:
                                attrs = attributes.from_mrd_header(obj)  # refuse an unusable header early
                            except attributes.HeaderError as e:
                                raise StreamError(str(e)) from None
                            header = obj
                            writer = _UnitWriter(tmp, de.header_text or header_text(obj.toXML().encode()))
                        else:
                            log.warning("MRD stream from %s [%s]: ignoring a second header", peer, source)
                    elif isinstance(obj, (ConfigFile, ConfigText)):
                        config = str(obj).split("\x00", 1)[0]
                    elif isinstance(obj, ismrmrd.Waveform):
                        if writer is not None:
                            writer.waveform(obj)
                    elif isinstance(obj, ismrmrd.Image):
                        n_images += 1
                    elif isinstance(obj, np.ndarray):
                        n_arrays += 1
                    elif isinstance(obj, str):
                        if json_text is None and obj.lstrip().startswith("{"):
                            json_text = obj
            except EOFError:
                if stream.bytes_read == 0:
                    raise StreamError("") from None
                raise StreamError(
                    f"the stream ended without CLOSE {count()} (connection dropped or data "
                    "truncated); nothing was stored, send the scan again"
                ) from None
            except TimeoutError as e:
                raise StreamError(f"{e} {count()} (node.mrd_idle_timeout_s); nothing was stored") from None
            except (MessageTooLarge, StreamLimit) as e:
                raise StreamError(f"{e} ({count()}); nothing was stored") from None
            except MemoryError:
                raise StreamError(
                    f"a message too large for this node's memory {count()}; the stream is malformed"
                ) from None
            except (ValueError, TypeError, OverflowError, struct.error, UnicodeDecodeError) as e:
                # ismrmrd raises TypeError for an unknown image data type, OverflowError for absurd dimensions
                if stream.eof:
                    raise StreamError(
                        f"the stream ended in the middle of a message {count()} (connection "
                        "dropped or data truncated); nothing was stored, send the scan again"
                    ) from None
                raise StreamError(f"malformed MRD stream {count()}: {str(e)[:200]}") from None
            except OSError as e:
                raise StreamError(f"connection error {count()}: {e}") from None
            if header is None or writer is None:
                raise StreamError("no ISMRMRD header was received; the stream must carry the header (message 3)")
            if writer.n_acquisitions == 0:
                raise StreamError("no acquisitions received; nothing was stored")
            writer.close()
            study_uid = getattr(getattr(header, "studyInformation", None), "studyInstanceUID", None)
            if study_uid:
                attrs["studyInstanceUID"] = str(study_uid)[:64]
            if config:
                attrs["config"] = config[:200]
            if json_text:
                attrs["json"] = json_text[:4096]
            final = n.units_dir / f"{unit_id}.h5"
            unit = IngestUnit(
                kind="mrd", path=final, source=source, peer=peer, attributes=attrs, n_objects=writer.n_acquisitions
            )
            try:
                save_sidecar(unit)
                os.replace(tmp, final)
                fsync_dir(final.parent)
            except BaseException:
                sidecar_path(final).unlink(missing_ok=True)
                raise
        except BaseException:
            if writer is not None:
                writer.abort()
            tmp.unlink(missing_ok=True)
            raise
        log.info(
            "MRD unit %s from %s [%s]: %d acquisitions, %d waveforms%s in %.1f s (protocol %s, %s)",
            unit_id,
            peer,
            source,
            writer.n_acquisitions,
            writer.n_waveforms,
            f", {n_images} images ignored" if n_images else "",
            time.monotonic() - t0,
            attrs.get("protocolName", "?"),
            attrs.get("trajectory", "?"),
        )
        metrics.RECEIVED_BYTES.labels("mrd").inc(stream.bytes_read)
        metrics.STAGE_SECONDS.labels("receive").observe(time.monotonic() - t0)
        return unit


def tls_server_context(cfg: SiteConfig) -> ssl.SSLContext:
    """The TLS context of the MRD TLS port from ``node.tls`` (cert, key, ca, require_client_cert); TLS >= 1.2."""
    tls = getattr(cfg.node, "tls", None)
    if tls is None:
        raise ValueError(
            "node.mrd_tls_port is set but node.tls (cert, key) is missing; add a node.tls block with "
            "the node's certificate and key, or remove node.mrd_tls_port"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca:
            ctx.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"node.tls: cannot load the certificate / key / CA ({e}); check the PEM files") from None
    if tls.require_client_cert:
        if not tls.ca:
            raise ValueError("node.tls.require_client_cert needs node.tls.ca (the CA that signs scanner certificates)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
