"""MRD (ISMRMRD streaming protocol v1) server: one thread per scanner connection, stream -> spool -> job.

A connection is one unit: [config file | config text] header [text/JSON] acquisitions [waveforms, images] CLOSE.
Framing is ismrmrd's ``ProtocolDeserializer`` / ``ProtocolSerializer``; the socket under it enforces an idle
timeout and a maximum message size, so a stalled or malformed peer never hangs a thread or exhausts memory.
Acquisitions are appended to an ISMRMRD HDF5 file in ``<spool>/tmp`` in blocks (bounded memory), fsynced and
renamed to ``<spool>/units/<unit id>.h5`` (with a ``.json`` sidecar naming the source); only then is the job
created and the scanner answered with TEXT ``job <id> queued`` and CLOSE. Anything wrong is answered with TEXT
``ERR <reason>`` and CLOSE, creates no job, and leaves no file behind.

Routes with ``reply_over_mrd: true`` run the pipeline on the connection's thread and send the outputs back as
MRD images (magnitude, ``image_series_index`` per output kind, meta attributes ``recon_node_kind``,
``recon_node_unit``, ``recon_node_job``) before ``job <id> done`` and CLOSE.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import ismrmrd.xsd as x
import numpy as np
from ismrmrd.hdf5 import acquisition_dtype, acquisition_header_dtype, waveform_dtype, waveform_header_dtype
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer

from node.config import SiteConfig, find_source, spool_space_problem
from node.durable import fsync_dir, write_durably
from node.ingest.units import IngestUnit, UnitHandler
from node.routing import route

log = logging.getLogger("recon-node.mrd")

# run_sync(unit) -> (job id, worker JobResult) for reply_over_mrd routes
SyncRunner = Callable[[IngestUnit], tuple[str, Any]]

_BLOCK_BYTES = 16 << 20  # acquisitions buffered before one HDF5 append
_ACQUISITION_ID = 1008
_ACQ_HEADER_SIZE = acquisition_header_dtype.itemsize  # 340
_ACQ_FIELD = {k: acquisition_header_dtype.fields[k][1] for k in
              ("number_of_samples", "active_channels", "trajectory_dimensions")}


class StreamError(Exception):
    """A stream the node will not accept; the message is sent to the peer after ``ERR ``."""


class _MessageTooLarge(Exception):
    pass


class _SocketStream:
    """``read(n)`` over a socket for the deserializer: idle timeout, maximum read size, EOF flag."""

    def __init__(self, sock: socket.socket, idle_timeout: float, max_bytes: int) -> None:
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.max_bytes = max_bytes
        self.bytes_read = 0
        self.eof = False
        self._last_id: int | None = None
        sock.settimeout(idle_timeout)

    def read(self, n: int) -> bytes:
        n = int(n)
        if n > self.max_bytes:
            raise _MessageTooLarge(
                f"a message field of {n} bytes exceeds node.mrd_max_message_mb ({self.max_bytes >> 20} MB); "
                "the stream is malformed or the limit too low")
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except socket.timeout:
                raise TimeoutError(f"no data for {self.idle_timeout:g} s") from None
            if k == 0:
                self.eof = True
                break
            got += k
        self.bytes_read += got
        data = bytes(view[:got])
        self._guard(n, data)
        return data

    def _guard(self, n: int, data: bytes) -> None:
        """Check an acquisition header's sizes before ismrmrd allocates arrays from them (absurd lengths)."""
        if n == 2 and len(data) == 2:
            self._last_id = struct.unpack("<H", data)[0]
            return
        if self._last_id == _ACQUISITION_ID and n == _ACQ_HEADER_SIZE and len(data) == n:
            samples, channels, dims = (struct.unpack_from("<H", data, _ACQ_FIELD[k])[0] for k in
                                       ("number_of_samples", "active_channels", "trajectory_dimensions"))
            size = samples * (channels * 8 + dims * 4)
            if size > self.max_bytes:
                raise _MessageTooLarge(
                    f"an acquisition of {samples} samples x {channels} channels ({size >> 20} MB) exceeds "
                    f"node.mrd_max_message_mb ({self.max_bytes >> 20} MB); the stream is malformed or the limit "
                    "too low")
        self._last_id = None


_DECL = re.compile(rb"^\s*<\?xml[^>]*\?>")


def _header_text(raw: bytes) -> str:
    """The header as UTF-8 text with a declaration that says so (ismrmrd 1.15 declares ascii but sends UTF-8)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    m = _DECL.match(text.encode("utf-8"))
    if m:
        text = '<?xml version="1.0" encoding="UTF-8"?>' + text.encode("utf-8")[m.end():].decode("utf-8")
    return text


class _Deserializer(ProtocolDeserializer):
    """ProtocolDeserializer that keeps the header's XML text as sent and tolerates a wrong encoding declaration."""

    header_text: str | None = None

    def _deserialize_ismrmrd_header(self) -> x.ismrmrdHeader:
        length_bytes = self._stream.read(4)
        if len(length_bytes) < 4:
            raise EOFError("Incomplete header length")
        length = struct.unpack("<I", length_bytes)[0]
        raw = self._stream.read(length)
        if len(raw) < length:
            raise EOFError("Incomplete ISMRMRD header")
        text = _header_text(raw)
        try:
            header = x.CreateFromDocument(text.encode("utf-8"))
        except Exception as e:  # noqa: BLE001 - xsdata parser errors
            raise StreamError(f"the ISMRMRD header is not valid ISMRMRD XML ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.header_text = text
        return header


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


def _str_param(header: x.ismrmrdHeader, name: str) -> str | None:
    up = header.userParameters
    if up is None:
        return None
    return next((p.value for p in up.userParameterString if p.name == name), None)


def mrd_unit_attributes(header: x.ismrmrdHeader) -> dict[str, str]:
    """What routes may match on: protocolName, seriesDescription, trajectory, sequence, measurementID."""
    meas = header.measurementInformation
    attrs: dict[str, str] = {}
    if meas is not None:
        for key in ("protocolName", "seriesDescription", "measurementID"):
            value = getattr(meas, key, None)
            if value:
                attrs[key] = str(value)
    if header.encoding:
        attrs["trajectory"] = str(header.encoding[0].trajectory.value)
    seq = _str_param(header, "mrf_sequence_name")
    if seq:
        attrs["sequence"] = seq
    return attrs


def write_sidecar(path: Path, unit: IngestUnit) -> None:
    """``<unit>.json`` next to the unit: lets a restarted node rebuild the IngestUnit (source, peer, attributes)."""
    data = asdict(unit)
    data["path"] = str(unit.path)
    write_durably(path, json.dumps(data, indent=1).encode())


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
        fov = (float(geom.pixel_spacing_mm[1] * data.shape[2]), float(geom.pixel_spacing_mm[0] * data.shape[1]),
               float(geom.slice_thickness_mm))
        for i in range(data.shape[0]):
            img = ismrmrd.Image.from_array(np.ascontiguousarray(data[i]), transpose=False)
            img.image_type = ismrmrd.IMTYPE_MAGNITUDE
            img.image_series_index = series
            img.image_index = i + 1
            img.field_of_view = fov
            meta = ismrmrd.Meta({"DataRole": "Quantitative" if unit not in ("1", "") else "Image",
                                 "recon_node_kind": out.kind, "recon_node_unit": unit, "recon_node_job": job_id,
                                 "SeriesDescription": f"{out.description} [{unit}]", "ImageRowDir": list(geom.orientation[:3]),
                                 "ImageColumnDir": list(geom.orientation[3:])})
            img.attribute_string = meta.serialize()
            images.append(img)
    return images


class MRDServer:
    """Listens on ``cfg.node.bind:cfg.node.mrd_port``; ``start()`` returns once listening (``.port`` is the port)."""

    def __init__(self, cfg: SiteConfig, handler: UnitHandler, run_sync: SyncRunner | None = None) -> None:
        self.cfg = cfg
        self.handler = handler
        self.run_sync = run_sync
        self.port = cfg.node.mrd_port
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def start(self) -> MRDServer:
        for d in (self.cfg.node.units_dir, self.cfg.node.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        family = socket.AF_INET6 if ":" in self.cfg.node.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.node.bind, self.cfg.node.mrd_port))
        except OSError as e:
            sock.close()
            raise OSError(f"MRD server cannot listen on {self.cfg.node.bind}:{self.cfg.node.mrd_port} ({e.strerror}); "
                          "another program uses the port - change node.mrd_port or stop it") from None
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="mrd-accept", daemon=True)
        self._thread.start()
        log.info("MRD server listening on %s:%d", self.cfg.node.bind, self.port)
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

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, addr = self._sock.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            t = threading.Thread(target=self._serve, args=(conn, addr[0]), name=f"mrd-{addr[0]}:{addr[1]}",
                                 daemon=True)
            with self._lock:
                self._conns.add(t)
            t.start()

    # ---- one connection ------------------------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: str) -> None:
        out = sock.makefile("wb")
        ser = ProtocolSerializer(out)
        try:
            self._serve_inner(sock, peer, ser, out)
        except Exception as e:  # noqa: BLE001 - one connection never takes the server down
            log.exception("MRD connection from %s: unexpected error: %s", peer, e)
            self._reply(ser, out, f"ERR internal error in the node ({type(e).__name__}: {e}); see the node log")
        finally:
            for closable in (out, sock):
                try:
                    closable.close()
                except OSError:
                    pass
            with self._lock:
                self._conns.discard(threading.current_thread())

    def _reply(self, ser: ProtocolSerializer, out: Any, *texts: str, images: list[ismrmrd.Image] = ()) -> None:
        """Send images, texts and CLOSE; a peer that already left is not an error."""
        try:
            for img in images:
                ser.serialize(img)
            for t in texts:
                ser.serialize(t)
            ser.close()
            out.flush()
        except OSError as e:
            log.info("could not send the reply (%s): %s", " | ".join(texts), e)

    def _refuse(self, sock: socket.socket, ser: ProtocolSerializer, out: Any, text: str,
                linger_s: float = 1.0, linger_bytes: int = 1 << 20) -> None:
        """Answer ERR + CLOSE, then discard (never parse) what the peer still sends for a moment, so that closing
        with unread data does not reset the connection before the peer has read the answer."""
        self._reply(ser, out, text)
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(linger_s)
            drained, deadline = 0, time.monotonic() + linger_s
            while time.monotonic() < deadline and drained < linger_bytes:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def _serve_inner(self, sock: socket.socket, peer: str, ser: ProtocolSerializer, out: Any) -> None:
        cfg = self.cfg
        src = find_source(cfg, "mrd", peer, None)
        if src is None and cfg.reject_unknown_sources:
            log.warning("MRD connection from %s refused: no source with protocol mrd lists this host", peer)
            self._refuse(sock, ser, out, f"ERR unknown source {peer}: this host is not a configured MRD source "
                                         "of this node (ask the node's administrator to add it under sources)")
            return
        source = src.name if src else "unknown"
        problem = spool_space_problem(cfg)
        if problem:
            log.error("MRD connection from %s [%s] refused: %s", peer, source, problem)
            self._refuse(sock, ser, out, f"ERR {problem}")
            return
        try:
            unit = self._receive(sock, peer, source)
        except StreamError as e:
            if str(e) == "":  # a connect-and-close probe (health check): nothing to answer
                log.debug("MRD connection from %s [%s] closed without data", peer, source)
                return
            log.warning("MRD stream from %s [%s] rejected: %s", peer, source, e)
            self._refuse(sock, ser, out, f"ERR {e}", linger_s=2.0, linger_bytes=256 << 20)
            return
        r = route(cfg, unit)
        if r is not None and r.reply_over_mrd and self.run_sync is not None:
            job_id, result = self.run_sync(unit)
            if result.ok:
                images = images_for_outputs(result.outputs, job_id)
                log.info("job %s [%s]: sending %d images back over MRD to %s", job_id, source, len(images), peer)
                self._reply(ser, out, f"job {job_id} done", images=images)
            else:
                self._reply(ser, out, f"ERR job {job_id} {result.state}: {result.error}")
            return
        try:
            job_id = self.handler(unit)
        except Exception as e:  # noqa: BLE001
            log.exception("MRD unit %s from %s [%s]: could not create its job", unit.path.name, peer, source)
            self._reply(ser, out, f"ERR the data was stored as {unit.path.name} but its job could not be created "
                                  f"({type(e).__name__}: {e}); it will be picked up when the node restarts")
            return
        if r is None:
            self._reply(ser, out, f"job {job_id} unrouted: no route of this node matches this scan "
                                  f"({', '.join(f'{k}={v}' for k, v in unit.attributes.items())}); the data is kept")
        else:
            self._reply(ser, out, f"job {job_id} queued")

    def _receive(self, sock: socket.socket, peer: str, source: str) -> IngestUnit:
        cfg = self.cfg
        unit_id = f"mrd-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        tmp = cfg.node.tmp_dir / f"{unit_id}.h5.partial"
        stream = _SocketStream(sock, cfg.node.mrd_idle_timeout_s, cfg.node.mrd_max_message_mb << 20)
        de = _Deserializer(stream)
        writer: _UnitWriter | None = None
        header: x.ismrmrdHeader | None = None
        config = ""
        texts: list[str] = []
        n_images = n_arrays = 0
        t0 = time.monotonic()

        def count() -> str:
            return f"after {writer.n_acquisitions if writer else 0} acquisitions"

        try:
            try:
                for obj in de.deserialize():
                    if isinstance(obj, ismrmrd.Acquisition):
                        if writer is None:
                            raise StreamError("an acquisition arrived before the ISMRMRD header; send the header "
                                              "(message 3) first")
                        writer.acquisition(obj)
                    elif isinstance(obj, x.ismrmrdHeader):
                        if header is None:
                            header = obj
                            writer = _UnitWriter(tmp, de.header_text or _header_text(obj.toXML().encode()))
                        else:
                            log.warning("MRD stream from %s [%s]: ignoring a second header", peer, source)
                    elif isinstance(obj, (ConfigFile, ConfigText)):
                        config = str(obj)
                    elif isinstance(obj, ismrmrd.Waveform):
                        if writer is not None:
                            writer.waveform(obj)
                    elif isinstance(obj, ismrmrd.Image):
                        n_images += 1
                    elif isinstance(obj, np.ndarray):
                        n_arrays += 1
                    elif isinstance(obj, str):
                        texts.append(obj)
            except EOFError:
                if stream.bytes_read == 0:
                    raise StreamError("") from None
                raise StreamError(f"the stream ended without CLOSE {count()} (connection dropped or data "
                                  "truncated); nothing was stored, send the scan again") from None
            except TimeoutError as e:
                raise StreamError(f"{e} {count()} (node.mrd_idle_timeout_s); nothing was stored") from None
            except _MessageTooLarge as e:
                raise StreamError(f"{e} ({count()})") from None
            except MemoryError:
                raise StreamError(f"a message too large for this node's memory {count()}; the stream is "
                                  "malformed") from None
            except (ValueError, struct.error) as e:
                if stream.eof:
                    raise StreamError(f"the stream ended in the middle of a message {count()} (connection "
                                      "dropped or data truncated); nothing was stored, send the scan again") from None
                raise StreamError(f"malformed MRD stream {count()}: {e}") from None
            except OSError as e:
                raise StreamError(f"connection error {count()}: {e}") from None
            if header is None or writer is None:
                raise StreamError("no ISMRMRD header was received; the stream must carry the header (message 3)")
            if writer.n_acquisitions == 0:
                raise StreamError("no acquisitions received; nothing was stored")
            writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            tmp.unlink(missing_ok=True)
            raise
        attrs = mrd_unit_attributes(header)
        if config:
            attrs["config"] = config[:200]
        json_texts = [t for t in texts if t.lstrip().startswith("{")]
        if json_texts:
            attrs["json"] = json_texts[0]
        final = cfg.node.units_dir / f"{unit_id}.h5"
        unit = IngestUnit(kind="mrd", path=final, source=source, peer=peer, attributes=attrs,
                          n_objects=writer.n_acquisitions)
        try:
            write_sidecar(final.with_suffix(".json"), unit)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            final.with_suffix(".json").unlink(missing_ok=True)
            raise
        log.info("MRD unit %s from %s [%s]: %d acquisitions, %d waveforms%s in %.1f s (protocol %s, %s)",
                 unit_id, peer, source, writer.n_acquisitions, writer.n_waveforms,
                 f", {n_images} images ignored" if n_images else "", time.monotonic() - t0,
                 attrs.get("protocolName", "?"), attrs.get("trajectory", "?"))
        return unit
