"""DICOM C-ECHO / C-STORE SCP: receives image series (and ISMRMRD raw data wrapped in DICOM) into the spool.

Behaviour (see README_dicom.md for the operator's view):

* **Association checks** happen on the A-ASSOCIATE-RQ, before anything is accepted: a wrong called AE title is
  rejected with "called AE title not recognised", a calling AE title / peer address that matches no configured
  DICOM source with "calling AE title not recognised" (unless ``reject_unknown_sources`` is false: then the
  association is accepted under the source name ``unknown``). Every rejection is logged with AE title and IP.
* **Durable store**: each instance is written as a DICOM Part 10 file exactly as received (file meta + the
  received encoding, compressed transfer syntaxes as-is) to a hidden temp file in its group folder, fsynced,
  renamed atomically and the folder fsynced -- only then is Success returned. Layout:
  ``<spool>/incoming/<source>/<StudyInstanceUID or SeriesInstanceUID>/<SOPInstanceUID>.dcm``; a resent instance
  overwrites its file (idempotent).
* **Failure statuses**: 0xA700 free disk would fall below ``disk_reserve_mb`` (nothing written); 0xA701 the
  spool could not be written (I/O error); 0xC210 the dataset cannot be decoded; 0xC211 SOPInstanceUID /
  StudyInstanceUID (or SeriesInstanceUID when grouping by series) missing or not a valid UID; 0xC212 an embedded
  ISMRMRD file is not readable. Each failure carries an ErrorComment and is logged with the calling AE.
* **Grouping**: :class:`node.ingest.grouping.QuietWindowGrouper` releases a group after its quiet time and once
  every association that stored into it has closed; the folder is renamed to ``<spool>/units/<unit id>/`` and the
  handler receives an :class:`IngestUnit` of kind ``dicom``.
* **ISMRMRD in DICOM**: a Raw Data Storage instance carrying an ISMRMRD HDF5 file (the convention of
  :mod:`pipelines.io.ismrmrd_dicom`) is extracted to ``<spool>/units/<unit id>.h5`` and handed over at once as a
  unit of kind ``mrd``.
* **Restart**: groups left in ``incoming`` get a fresh quiet window and temp files are deleted. Every unit is
  given its sidecar (:func:`node.ingest.units.save_sidecar`) before it gets its final name, so the service's
  start-up rescan can create the job of a unit whose hand-over never happened.
* Handler calls run one at a time on a dispatch thread; an exception is logged and the unit stays on disk.

Hardening (issue 15):

* **Transfer syntaxes**: only those the node can decode are accepted -- the native ones (implicit / explicit VR
  little endian, deflated, big endian) and, with ``node.dicom_accept_compressed``, every compressed one for which
  pydicom has a working decoder plug-in (pylibjpeg + libjpeg / openjpeg / rle: JPEG baseline / extended /
  lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE). A compressed instance whose pixel data does not decode is refused
  (0xC210) instead of being acknowledged and failing in the pipeline.
* **Dataset size**: received datasets are written to ``<spool>/incoming/.rx/`` while they arrive (pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET``), never held in memory whole; past ``node.dicom_max_dataset_mb`` the rest of the
  dataset is discarded as it arrives and the instance is refused with 0xA702 -- memory and disk stay bounded.
* **UIDs**: SOP Instance / Study / Series UIDs are checked with :func:`node.uids.validate_uid` (PS3.5 grammar,
  64 characters) before they name a file; an invalid or empty one fails that instance only (0xC211), the
  association goes on.
* **TLS**: ``node.dicom_tls_port`` with the ``node.tls`` certificate block (cert, key, CA, ``require_client_cert``)
  opens a DICOM TLS port beside the plain one (bind the plain one to loopback or firewall it to go TLS-only).
* **Audit**: association accepted / refused, instance stored / refused go to :mod:`node.audit`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    MRImageStorage,
    RawDataStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, dimse_messages, evt, transport
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import time, unseen by mypy

from node import audit, metrics, uids
from node.config import find_source
from node.durable import copy_durably, fsync_dir, write_durably
from node.ingest import attributes
from node.ingest.grouping import Group, GroupStatus, QuietWindowGrouper
from node.ingest.units import IngestUnit, UnitHandler, save_sidecar
from node.tcp import no_delay
from pipelines.io.ismrmrd_dicom import embedded_ismrmrd

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[str, ...] = (
    MRImageStorage,
    EnhancedMRImageStorage,
    RawDataStorage,
    SecondaryCaptureImageStorage,
)

# C-STORE statuses (PS3.4 B.2.3; the C2xx codes are our "cannot understand" sub-codes).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
WRITE_FAILED = 0xA701
DATASET_TOO_LARGE = 0xA702  # A7xx "Refused: Out of Resources": larger than node.dicom_max_dataset_mb
CANNOT_DECODE = 0xC210
MISSING_UID = 0xC211
BAD_ISMRMRD = 0xC212

UNKNOWN_SOURCE = "unknown"
GROUP_INFO = ".group.json"  # sidecar in each incoming group folder: source, first association, first instance

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
RX_DIR = ".rx"  # <spool>/incoming/.rx: datasets being received (a source folder never starts with ".")


# ---- transfer syntaxes -----------------------------------------------------------------------------------------
_NATIVE_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)


def decodable_transfer_syntaxes(accept_compressed: bool = True) -> list[str]:
    """The transfer syntaxes this node can decode: the native ones, plus (``accept_compressed``) each compressed
    one whose pydicom pixel decoder has an installed plug-in. Accepting anything else would acknowledge data that
    the pipeline cannot read (issue 15: JPEG Lossless acknowledged, then ``all plugins are missing``)."""
    out = list(_NATIVE_SYNTAXES)
    if not accept_compressed:
        return out
    from pydicom.pixels import get_decoder

    for ts in ALL_TRANSFER_SYNTAXES:
        if ts in out:
            continue
        try:
            if get_decoder(UID(ts)).is_available:
                out.append(str(ts))
        except (NotImplementedError, ValueError):  # no decoder at all for this syntax (MPEG, JPIP ...)
            continue
    return out


# ---- received datasets go to the spool, bounded ---------------------------------------------------------------
# pynetdicom writes a C-STORE dataset to a NamedTemporaryFile while it arrives when STORE_RECV_CHUNKED_DATASET is
# set. Two additions, bound to the association by the wrapper below: the file goes to <spool>/incoming/.rx (patient
# data never lands in /tmp, and is covered by the spool's permissions), and once a dataset passes the size limit
# its remaining fragments are dropped as they arrive, so a 200 MB element costs neither memory nor disk; the
# C-STORE handler then refuses it (0xA702).
_rx = threading.local()
_too_large: dict[str, int] = {}  # temp file path -> bytes seen, for datasets over the limit
_too_large_lock = threading.Lock()
_orig_decode_msg = dimse_messages.DIMSEMessage.decode_msg
_orig_named_temp = dimse_messages.NamedTemporaryFile


def _rx_temp_file(*args: Any, **kwargs: Any) -> Any:
    folder = getattr(_rx, "dir", None)
    if folder is not None:
        kwargs.setdefault("dir", folder)
        kwargs.setdefault("prefix", ".rx-")
    return _orig_named_temp(*args, **kwargs)


_C_STORE_RQ = 0x0001
_STORE_UID_KEYWORDS = ("AffectedSOPClassUID", "AffectedSOPInstanceUID")
# Stands in for a missing / empty UID in a C-STORE command (pynetdicom needs a value to spool the dataset under);
# the handler refuses any request carrying it.
MISSING_UID_MARK = "0.0"


def _complete_store_command(self: Any, data: bytes) -> bytes:
    """The last command fragment of a C-STORE-RQ whose command set lacks an Affected SOP Class / Instance UID
    (pynetdicom leaves out an empty UID) or has it empty: re-encoded with :data:`MISSING_UID_MARK` there.

    Without it pynetdicom drops the request as invalid and never answers, so the peer times out and aborts the
    whole association (issue 15: "an empty SOP UID aborts the whole association"). With it the request reaches the
    C-STORE handler, which refuses that one instance (0xC211) and the association goes on."""
    from pynetdicom.dsutils import decode, encode

    try:
        from io import BytesIO

        cs = decode(BytesIO(self.encoded_command_set.getvalue() + data[1:]), True, True)
        if int(cs.get("CommandField", 0) or 0) != _C_STORE_RQ or all(cs.get(k) for k in _STORE_UID_KEYWORDS):
            return data
        for k in _STORE_UID_KEYWORDS:
            if not cs.get(k):
                setattr(cs, k, MISSING_UID_MARK)
        del cs.CommandGroupLength
        body = encode(cs, True, True)
        if body is None:
            return data
        cs.CommandGroupLength = len(body)
        self.encoded_command_set = BytesIO()
        return data[:1] + (encode(cs, True, True) or b"")
    except Exception:  # noqa: BLE001 - leave anything odd to pynetdicom's own handling
        return data


# Attributes this node sets on pynetdicom's own objects, which the hooks below read back: the (spool folder, byte
# limit) of one of our associations, and the PDU size cap of our AE.
_RX_LIMITS_ATTR = "recon_node_rx"
_PDU_CAP_ATTR = "recon_node_pdu_cap"


def _bounded_decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:
    limits = getattr(assoc, _RX_LIMITS_ATTR, None)
    if limits is None:  # not one of our associations (e.g. a test's own SCP in this process)
        return _orig_decode_msg(self, primitive, assoc)
    folder, limit = limits
    pdvs = getattr(primitive, "presentation_data_value_list", None) or []
    if any(d and d[0] & 3 == 3 for _, d in pdvs):  # the last fragment of a command set
        primitive.presentation_data_value_list = [
            [cx, _complete_store_command(self, d) if d and d[0] & 3 == 3 else d] for cx, d in pdvs
        ]
    f = getattr(self, "_data_set_file", None)
    seen = int(getattr(self, "_recon_rx_bytes", 0))
    if f is not None and getattr(primitive, "presentation_data_value_list", None):
        kept = []
        for cx, data in primitive.presentation_data_value_list:
            if not data[0] & 1:  # a dataset fragment
                seen += len(data) - 1
                if seen > limit:
                    with _too_large_lock:
                        _too_large[str(f.name)] = seen
                    data = data[:1]  # keep the control byte (last-fragment flag), drop the bytes
            kept.append([cx, data])
        primitive.presentation_data_value_list = kept
        self._recon_rx_bytes = seen
    _rx.dir = folder
    try:
        return _orig_decode_msg(self, primitive, assoc)
    finally:
        _rx.dir = None


# pynetdicom reads a whole PDU into memory, as long as its 4-byte length field says, before anything else sees it.
# A peer that ignores our maximum PDU length (16 KB) could so push hundreds of MB into memory in one P-DATA-TF,
# past every dataset limit. Any PDU longer than PDU_CAP_BYTES on one of our associations closes the connection
# before it is read (a protocol violation: conforming peers never come near it).
PDU_CAP_BYTES = 4 * 2**20
_orig_sock_recv = transport.AssociationSocket.recv


def _bounded_sock_recv(self: Any, nr_bytes: int) -> bytearray:
    assoc = getattr(self, "_assoc", None)
    cap = getattr(getattr(assoc, "ae", None), _PDU_CAP_ATTR, None)
    if cap is not None and nr_bytes > cap:
        log.error(
            "peer %s: PDU of %d bytes announced, more than %d; connection closed (the peer ignores the "
            "maximum PDU length)",
            getattr(getattr(assoc, "requestor", None), "address", "?"),
            nr_bytes,
            cap,
        )
        audit.event(
            "dicom.association.refused",
            "refused",
            actor_ip=str(getattr(getattr(assoc, "requestor", None), "address", "")),
            reason=f"PDU of {nr_bytes} bytes over {cap}",
        )
        raise OSError(f"PDU of {nr_bytes} bytes exceeds {cap}")
    return _orig_sock_recv(self, nr_bytes)


def _install_rx_hooks() -> None:
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _rx_temp_file
    # pynetdicom has no hook for these two: its methods are replaced in place (mypy flags any method assignment).
    dimse_messages.DIMSEMessage.decode_msg = _bounded_decode_msg  # type: ignore[method-assign]
    transport.AssociationSocket.recv = _bounded_sock_recv  # type: ignore[method-assign]


# ---- small helpers ---------------------------------------------------------------------------------------------
def _safe_name(name: str) -> str:
    """A path component from a source name (sidecar files keep the real name)."""
    s = _UNSAFE.sub("_", name.strip()) or "_"
    return "_" + s if s.startswith(".") else s


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


def _new_unit_id(prefix: str) -> str:
    return f"{prefix}-{datetime.now().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _instances(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.dcm") if p.is_file() and not p.name.startswith("."))


def _refuse_instance(
    peer: _Peer,
    status: int,
    comment: str,
    reason: str,
    metric: str = "error",
    outcome: str = "failure",
    sop_uid: str | None = None,
) -> Dataset:
    """A C-STORE answered with a failure ``status``: counted, audit-logged against the peer, ErrorComment set."""
    metrics.UNITS_REJECTED.labels("dicom", metric).inc()
    extra = {"sop_uid": sop_uid} if sop_uid is not None else {}
    audit.event(
        "dicom.instance.refused",
        outcome,
        actor_ae=peer.calling_ae,
        actor_ip=peer.address,
        source=peer.source,
        status=f"0x{status:04X}",
        reason=reason,
        **extra,
    )
    return _status(status, comment)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # LO: 64 characters, no backslash or control characters (the comment may quote a hostile value).
    ds.ErrorComment = "".join(c if 32 <= ord(c) < 127 and c != "\\" else "?" for c in comment)[:64]
    return ds


# ---- the SCP ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Peer:
    """One accepted association: where it came from and which source it belongs to."""

    source: str
    calling_ae: str
    called_ae: str
    address: str

    def who(self) -> str:
        return f"source={self.source} ae={self.calling_ae} peer={self.address}"


class _StoreFailure(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


FindSource = Callable[[Any, str, str, "str | None"], Any]


class DicomSCP:
    """C-ECHO / C-STORE SCP of the node. ``start()`` returns at once; ``stop()`` closes the port."""

    def __init__(
        self,
        cfg: Any,
        handler: UnitHandler,
        clock: Callable[[], float] = time.monotonic,
        find_source: FindSource | None = None,
    ) -> None:
        self.cfg = cfg
        self.handler = handler
        self._find_source = find_source
        self.spool = Path(cfg.node.spool_dir)
        self.incoming = self.spool / "incoming"
        self.units = self.spool / "units"
        self.grouper = QuietWindowGrouper(self._release, clock=clock)
        self._peers: dict[int, _Peer] = {}
        self._lock = threading.Lock()
        self._dispatch: ThreadPoolExecutor | None = None
        self._server: Any = None
        self._tls_server: Any = None
        self.rx_dir = self.incoming / RX_DIR
        self.max_dataset_bytes = int(float(getattr(cfg.node, "dicom_max_dataset_mb", 512)) * 2**20)
        self.transfer_syntaxes = decodable_transfer_syntaxes(bool(getattr(cfg.node, "dicom_accept_compressed", True)))
        self.ae = self._make_ae()

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.add_supported_context(Verification)
        for sop in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop, self.transfer_syntaxes)
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.maximum_associations = 16
        setattr(ae, _PDU_CAP_ATTR, max(PDU_CAP_BYTES, 2 * int(ae.maximum_pdu_size or 0)))  # see _bounded_sock_recv
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            return int(self.cfg.node.dicom_port)
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The DICOM TLS port (None without ``node.dicom_tls_port``)."""
        if self._tls_server is not None:
            return int(self._tls_server.server_address[1])
        port = getattr(self.cfg.node, "dicom_tls_port", None)
        return None if port is None else int(port)

    def _ssl_context(self) -> ssl.SSLContext | None:
        """Server-side TLS context from ``node.tls``: our certificate; client certificates verified against the
        CA, required when ``require_client_cert``."""
        tls = getattr(self.cfg.node, "tls", None)
        if getattr(self.cfg.node, "dicom_tls_port", None) is None:
            return None
        if tls is None:
            raise ValueError(
                "node.dicom_tls_port is set but node.tls (cert, key) is missing; add a node.tls block "
                "with the node's certificate and key"
            )
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=str(tls.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
        elif tls.require_client_cert:
            raise ValueError("node.tls.require_client_cert needs node.tls.ca (the CA of the client certificates)")
        else:
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def start(self) -> None:
        """Recover the spool, start the grouper and the dispatcher, open the port (non-blocking)."""
        if self._server is not None:
            return
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.units.mkdir(parents=True, exist_ok=True)
        self.rx_dir.mkdir(parents=True, exist_ok=True)
        _install_rx_hooks()
        ssl_context = self._ssl_context()  # before anything starts: a bad certificate stops the node here
        self._dispatch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recon-node-dicom-dispatch")
        self._recover()
        self.grouper.start()
        handlers: list[EventHandlerType] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        bind = self.cfg.node.bind or "0.0.0.0"
        self._server = self.ae.start_server((bind, int(self.cfg.node.dicom_port)), block=False, evt_handlers=handlers)
        if ssl_context is not None:
            self._tls_server = self.ae.start_server(
                (bind, int(self.cfg.node.dicom_tls_port)), block=False, evt_handlers=handlers, ssl_context=ssl_context
            )
        log.info(
            "DICOM SCP %s listening on %s:%d%s (spool %s; %d transfer syntaxes; datasets up to %.0f MB)",
            self.cfg.node.ae_title,
            bind,
            self.port,
            f", TLS on {self.tls_port}" if self._tls_server is not None else "",
            self.spool,
            len(self.transfer_syntaxes),
            self.max_dataset_bytes / 2**20,
        )

    def stop(self) -> None:
        """Close the port and stop the threads. Pending groups stay in the spool and are re-armed on next start."""
        if self._tls_server is not None:
            self._tls_server.shutdown()
        self._tls_server = None
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.grouper.stop()
        if self._dispatch is not None:
            self._dispatch.shutdown(wait=True)
            self._dispatch = None
        log.info("DICOM SCP %s stopped", self.cfg.node.ae_title)

    def pending_groups(self) -> list[GroupStatus]:
        """Groups still in their quiet window (source, key, instances, seconds until release)."""
        return self.grouper.pending()

    # ---- config helpers --------------------------------------------------------------------------------------
    def _lookup_source(self, peer_ip: str, calling_ae: str) -> Any:
        find = self._find_source or find_source
        return find(self.cfg, "dicom", peer_ip, calling_ae)

    def _grouping(self, source: str) -> tuple[str, float]:
        rule = self.cfg.grouping_for(source)
        by = str(rule.by)
        return ("series" if by == "series" else "study"), float(rule.quiet_seconds)

    # ---- association events ----------------------------------------------------------------------------------
    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        no_delay(assoc)  # our C-STORE responses must not wait for the sender's delayed ACK
        rq = assoc.requestor.primitive
        assert rq is not None  # EVT_REQUESTED fires once the A-ASSOCIATE-RQ has been received
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        address = assoc.requestor.address
        own = str(self.cfg.node.ae_title).strip()
        if called != own:
            log.warning(
                "association rejected: called AE %r is not this node (%r); calling ae=%s peer=%s",
                called,
                own,
                calling,
                address,
            )
            self._refuse(assoc, 0x07, "called AE title not recognised", calling, address, called)
            return
        try:
            source = self._lookup_source(address, calling)
        except Exception as e:
            log.error(
                "association rejected: source lookup failed for ae=%s peer=%s (%s: %s)",
                calling,
                address,
                type(e).__name__,
                e,
                exc_info=True,
            )
            self._refuse(assoc, 0x01, f"source lookup failed: {type(e).__name__}", calling, address, called)
            return
        if source is None:
            if bool(getattr(self.cfg, "reject_unknown_sources", True)):
                log.warning(
                    "association rejected: calling ae=%s peer=%s matches no configured DICOM source "
                    "(add it under 'sources' with protocols [dicom])",
                    calling,
                    address,
                )
                self._refuse(assoc, 0x03, "calling AE title / host not a configured source", calling, address, called)
                return
            name = UNKNOWN_SOURCE
            log.warning(
                "association from unconfigured ae=%s peer=%s accepted as source %r (reject_unknown_sources is false)",
                calling,
                address,
                name,
            )
        else:
            name = str(source.name)
        with self._lock:
            self._peers[id(assoc)] = _Peer(name, calling, called, address)
        # Bind the bounded, spooled receive (module top) to this association.
        setattr(assoc, _RX_LIMITS_ATTR, (str(self.rx_dir), self.max_dataset_bytes))
        tls = assoc.dul.socket is not None and isinstance(getattr(assoc.dul.socket, "socket", None), ssl.SSLSocket)
        audit.event(
            "dicom.association.accepted", actor_ae=calling, actor_ip=address, called_ae=called, source=name, tls=tls
        )
        log.info("source=%s ae=%s peer=%s: association requested%s", name, calling, address, " (TLS)" if tls else "")

    @staticmethod
    def _refuse(assoc: Any, diagnostic: int, reason: str, calling: str, address: str, called: str) -> None:
        """Audit the refusal, then reject permanently (service user) and stop the association as pynetdicom's
        own checks do."""
        metrics.UNITS_REJECTED.labels("dicom", "error" if diagnostic == 0x01 else "unknown_source").inc()
        audit.event(
            "dicom.association.refused",
            "refused",
            actor_ae=calling,
            actor_ip=address,
            called_ae=called,
            reason=reason,
        )
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _peer(self, event: evt.Event) -> _Peer:
        with self._lock:
            peer = self._peers.get(id(event.assoc))
        if peer is None:  # cannot happen: every accepted association passed _on_requested
            rq = event.assoc.requestor
            peer = _Peer(UNKNOWN_SOURCE, str(rq.ae_title).strip(), str(self.cfg.node.ae_title), rq.address)
        return peer

    def _on_echo(self, event: evt.Event) -> int:
        log.info("%s: C-ECHO", self._peer(event).who())
        return SUCCESS

    def _on_close(self, event: evt.Event) -> None:
        with self._lock:
            peer = self._peers.pop(id(event.assoc), None)
        if peer is not None:
            self.grouper.association_closed(id(event.assoc))
            log.debug("%s: association closed", peer.who())

    # ---- C-STORE ---------------------------------------------------------------------------------------------
    def _on_store(self, event: evt.Event) -> int | Dataset:
        peer = self._peer(event)
        rx = self._received_path(event)
        try:
            status = self._store(event, peer, rx)
        except _StoreFailure as e:
            log.error("%s: C-STORE refused with 0x%04X: %s", peer.who(), e.status, e.comment)
            kind = "disk_full" if e.status == OUT_OF_RESOURCES else "invalid"
            return _refuse_instance(peer, e.status, e.comment, e.comment, kind, "refused", self._request_uid(event))
        except OSError as e:
            log.error(
                "%s: C-STORE failed: cannot write to the spool %s (%s); check the disk and permissions",
                peer.who(),
                self.spool,
                e,
                exc_info=True,
            )
            return _refuse_instance(peer, WRITE_FAILED, "node cannot write its spool", "spool not writable")
        except Exception as e:
            log.error("%s: C-STORE failed unexpectedly (%s: %s)", peer.who(), type(e).__name__, e, exc_info=True)
            name = type(e).__name__
            return _refuse_instance(peer, CANNOT_DECODE, f"cannot process dataset: {name}", name)
        finally:
            if rx is not None:
                with _too_large_lock:
                    _too_large.pop(str(rx), None)
        return status

    @staticmethod
    def _request_uid(event: evt.Event) -> str:
        """The command's Affected SOP Instance UID for logs (only when it is a valid UID)."""
        try:
            request = event.request
            assert isinstance(request, C_STORE)  # only called for EVT_C_STORE
            uid = str(request.AffectedSOPInstanceUID or "")
        except Exception:  # noqa: BLE001
            return ""
        return uid if uids.is_valid_uid(uid) else ""

    @staticmethod
    def _received_path(event: evt.Event) -> Path | None:
        """The spooled dataset (chunked receive), or None when pynetdicom kept it in memory."""
        try:
            p = event.dataset_path
        except AttributeError:
            return None
        if isinstance(p, tuple):
            p = p[0]
        return Path(p) if p else None

    def _decode(self, event: evt.Event, rx: Path | None) -> Dataset:
        ds: Dataset
        try:
            if rx is not None:
                ds = pydicom.dcmread(rx)  # preamble + file meta (pynetdicom's) + the dataset as received
            else:
                ds = event.dataset
                ds.file_meta = event.file_meta
            for _ in ds:  # decode every top-level element now, so a corrupt one fails here and not later
                pass
        except Exception as e:
            raise _StoreFailure(CANNOT_DECODE, f"cannot decode dataset ({type(e).__name__}: {e})") from e
        return ds

    def _check_pixels(self, ds: Dataset) -> None:
        """Compressed pixel data must decode now: acknowledging it and failing in the pipeline is what issue 15
        found. Native pixel data must at least be as long as Rows x Columns x frames x bits say."""
        ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        if "PixelData" not in ds:
            return
        if not ts.is_compressed:  # native: the pixel module must describe the bytes that came (cheap check)
            from pydicom.pixels.utils import get_expected_length

            try:
                rows, cols = int(ds.Rows), int(ds.Columns)
                expected = int(get_expected_length(ds, unit="bytes"))
            except Exception as e:
                raise _StoreFailure(CANNOT_DECODE, f"image pixel module incomplete ({type(e).__name__})") from e
            have = len(ds.PixelData or b"")
            if rows < 1 or cols < 1 or have < expected:
                raise _StoreFailure(CANNOT_DECODE, f"pixel data {have} bytes, pixel module says {expected}")
            return
        try:
            from pydicom.pixels import iter_pixels

            for _ in iter_pixels(ds):  # frame by frame: memory of one frame at a time
                pass
        except Exception as e:
            raise _StoreFailure(CANNOT_DECODE, f"{ts.name} pixel data does not decode ({type(e).__name__})") from e

    def _check_space(self, n_bytes: int) -> None:
        reserve = float(self.cfg.node.disk_reserve_mb) * 1024 * 1024
        free = shutil.disk_usage(self.spool).free
        if free - n_bytes < reserve:
            raise _StoreFailure(
                OUT_OF_RESOURCES,
                f"spool disk full: {free / 2**20:.0f} MB free, reserve {reserve / 2**20:.0f} MB",
            )

    def _store(self, event: evt.Event, peer: _Peer, rx: Path | None) -> int:
        if rx is not None:
            with _too_large_lock:
                seen = _too_large.get(str(rx))
            if seen is not None:
                raise _StoreFailure(
                    DATASET_TOO_LARGE,
                    f"dataset over {self.max_dataset_bytes / 2**20:.0f} MB (node.dicom_max_dataset_mb); not stored",
                )
        request = event.request
        assert isinstance(request, C_STORE)  # the EVT_C_STORE handler
        if MISSING_UID_MARK in (str(request.AffectedSOPInstanceUID), str(request.AffectedSOPClassUID)):
            raise _StoreFailure(MISSING_UID, "C-STORE request without Affected SOP Class / Instance UID")
        ds = self._decode(event, rx)
        by, quiet = self._grouping(peer.source)
        try:
            # Every UID that becomes a file name or a group key is checked against the UID grammar first.
            sop = uids.validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
            study = uids.validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            key = uids.validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID") if by == "series" else study
            if "SeriesInstanceUID" in ds:
                uids.validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
        except uids.InvalidUID as e:
            raise _StoreFailure(MISSING_UID, str(e)) from e

        if str(ds.get("SOPClassUID", "")) == RawDataStorage:
            payload = embedded_ismrmrd(ds)
            if payload is not None:
                return self._store_ismrmrd(payload, ds, peer)

        self._check_pixels(ds)
        data = None if rx is not None else event.encoded_dataset()
        size = rx.stat().st_size if rx is not None else len(data or b"")
        self._check_space(size)
        folder = self.incoming / _safe_name(peer.source) / key
        info = {
            "source": peer.source,
            "key": key,
            "by": by,
            "calling_ae": peer.calling_ae,
            "called_ae": peer.called_ae,
            "peer": peer.address,
            "first_instance": f"{sop}.dcm",
            "created": datetime.now().isoformat(timespec="seconds"),
            "created_at": time.time(),  # the receive time of the group (metrics), to the millisecond
        }
        self.grouper.hold(
            peer.source,
            key,
            folder,
            quiet,
            association=id(event.assoc),
            info=info,
            prepare=lambda p: self._prepare_group(p, info),
        )
        target = uids.safe_path_under(self.incoming, _safe_name(peer.source), key, f"{sop}.dcm")
        if rx is not None:
            copy_durably(rx, target)
        else:
            write_durably(target, data or b"")
        self.grouper.touch(peer.source, key)
        log.debug("%s: stored %s into %s %s", peer.who(), sop, by, key)
        audit.event(
            "dicom.instance.stored",
            actor_ae=peer.calling_ae,
            actor_ip=peer.address,
            source=peer.source,
            study_uid=study,
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            sop_uid=sop,
            bytes=size,
        )
        metrics.RECEIVED_BYTES.labels("dicom").inc(size)
        return SUCCESS

    def _prepare_group(self, folder: Path, info: dict[str, Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_durably(folder / GROUP_INFO, json.dumps(info, indent=1).encode("utf-8"))
        fsync_dir(folder.parent)
        log.info(
            "source=%s ae=%s peer=%s: new %s group %s",
            info["source"],
            info["calling_ae"],
            info["peer"],
            info["by"],
            info["key"],
        )

    def _store_ismrmrd(self, payload: bytes, ds: Dataset, peer: _Peer) -> int:
        self._check_space(len(payload))
        unit_id = _new_unit_id("dcmraw")
        target = self.units / f"{unit_id}.h5"
        tmp = self.units / f".{unit_id}.h5.tmp"
        try:
            write_durably(tmp, payload)  # durable under a temp name; renamed once it proved readable
            try:
                attrs, n = attributes.from_mrd_file(tmp)
            except Exception as e:
                raise _StoreFailure(BAD_ISMRMRD, f"embedded ISMRMRD file unreadable: {e}") from e
            unit = IngestUnit(
                kind="mrd",
                path=target,
                source=peer.source,
                calling_ae=peer.calling_ae,
                called_ae=peer.called_ae,
                peer=peer.address,
                attributes=attrs,
                n_objects=n,
            )
            sidecar = save_sidecar(unit)
            try:
                os.replace(tmp, target)
                fsync_dir(self.units)
            except BaseException:
                sidecar.unlink(missing_ok=True)
                raise
        finally:
            tmp.unlink(missing_ok=True)
        log.info(
            "%s: Raw Data Storage %s carried an ISMRMRD file (%d acquisitions) -> unit %s",
            peer.who(),
            ds.SOPInstanceUID,
            n,
            target.name,
        )
        audit.event(
            "dicom.instance.stored",
            actor_ae=peer.calling_ae,
            actor_ip=peer.address,
            source=peer.source,
            study_uid=str(ds.get("StudyInstanceUID", "")),
            sop_uid=str(ds.SOPInstanceUID),
            unit=target.name,
            bytes=len(payload),
        )
        metrics.RECEIVED_BYTES.labels("dicom").inc(len(payload))
        self._submit(unit)
        return SUCCESS

    # ---- release and hand-over -------------------------------------------------------------------------------
    def _release(self, group: Group) -> None:
        """Called by the grouper (its lock held): sidecar, move the group folder to units/, queue the hand-over."""
        folder = group.path
        files = _instances(folder) if folder.is_dir() else []
        if not files:
            log.warning(
                "source=%s group %s: released with no stored instance; removing %s", group.source, group.key, folder
            )
            shutil.rmtree(folder, ignore_errors=True)
            return
        info = group.info or self._group_info(folder)
        unit_id = _new_unit_id("dicom")
        target = self.units / unit_id
        unit = IngestUnit(
            kind="dicom",
            path=target,
            source=str(info.get("source") or group.source),
            calling_ae=str(info.get("calling_ae", "")),
            called_ae=str(info.get("called_ae", "")),
            peer=str(info.get("peer", "")),
            attributes=self._first_attributes(folder, files, info),
            n_objects=len(files),
        )
        sidecar = save_sidecar(unit)
        try:
            os.rename(folder, target)
            fsync_dir(self.units)
            fsync_dir(folder.parent)
        except BaseException:
            sidecar.unlink(missing_ok=True)
            raise
        log.info(
            "source=%s ae=%s group %s: %d instances released after %.0f s quiet -> unit %s",
            unit.source,
            unit.calling_ae,
            group.key,
            len(files),
            group.quiet_seconds,
            unit_id,
        )
        if isinstance(info.get("created_at"), (int, float)):  # first instance -> release, quiet window included
            metrics.STAGE_SECONDS.labels("receive").observe(max(0.0, time.time() - float(info["created_at"])))
        self._submit(unit)

    @staticmethod
    def _group_info(folder: Path) -> dict[str, Any]:
        try:
            info = json.loads((folder / GROUP_INFO).read_text("utf-8"))
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _first_attributes(folder: Path, files: list[Path], info: dict[str, Any]) -> dict[str, str]:
        """Routing attributes of the group's first instance (first received; after a restart, if unknown, the
        first by name)."""
        first = folder / str(info.get("first_instance", ""))
        if not first.is_file():
            first = files[0]
        try:
            return attributes.from_dicom_file(first)
        except Exception as e:  # it decoded when received; a damaged disk is the only way here
            log.error(
                "source=%s: cannot read %s (%s); the unit is handed over without attributes",
                info.get("source", "?"),
                first,
                e,
            )
            return {}

    def _submit(self, unit: IngestUnit) -> None:
        if self._dispatch is None:
            log.error(
                "source=%s: unit %s is in the spool but the SCP is stopped; it gets its job when the node starts again",
                unit.source,
                unit.path.name,
            )
            return
        self._dispatch.submit(self._hand_over, unit)

    def _hand_over(self, unit: IngestUnit) -> None:
        who = f"source={unit.source} ae={unit.calling_ae} peer={unit.peer}"
        try:
            admission = self.handler(unit)
        except Exception as e:
            log.error(
                "%s: unit %s (%s, %d objects) was not accepted by the node (%s: %s); it stays in the spool "
                "and gets its job when the node starts again",
                who,
                unit.path.name,
                unit.kind,
                unit.n_objects,
                type(e).__name__,
                e,
                exc_info=True,
            )
            return
        log.info(
            "%s: unit %s (%s, %d objects) handed over -> job %s (%s)",
            who,
            unit.path.name,
            unit.kind,
            unit.n_objects,
            admission.job_id,
            admission.state,
        )

    # ---- restart ---------------------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Delete temp files and re-arm a quiet window for every group left in incoming/ by a previous run.

        Units already in units/ without a job are the service's business (its start-up rescan reads the
        sidecars written here)."""
        for tmp in list(self.units.glob(".*.tmp")):
            tmp.unlink(missing_ok=True)
        if self.rx_dir.is_dir():  # datasets a killed node was receiving (never acknowledged)
            for tmp in list(self.rx_dir.iterdir()):
                tmp.unlink(missing_ok=True)
        for src_dir in sorted(p for p in self.incoming.iterdir() if p.is_dir() and p.name != RX_DIR):
            for folder in sorted(p for p in src_dir.iterdir() if p.is_dir()):
                for tmp in folder.iterdir():
                    if _is_temp(tmp):
                        log.info("removing leftover temp file %s", tmp)
                        tmp.unlink(missing_ok=True)
                files = _instances(folder)
                if not files:
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                info = self._group_info(folder) or {"source": src_dir.name, "key": folder.name}
                source = str(info.get("source") or src_dir.name)
                try:
                    _, quiet = self._grouping(source)
                except Exception:
                    quiet = 0.0
                self.grouper.arm(source, folder.name, folder, quiet, n_instances=len(files), info=info)
                log.info(
                    "source=%s group %s: %d instances from a previous run, released in %.0f s",
                    source,
                    folder.name,
                    len(files),
                    quiet,
                )
