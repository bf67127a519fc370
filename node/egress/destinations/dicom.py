"""``kind: dicom``: a PACS reached with DIMSE C-STORE (pynetdicom), optionally over DICOM TLS.

One association per pass, one C-STORE per instance. Success and warning statuses count as sent. An unreachable
PACS, a refused or aborted association, a failure status or a missing response mean retry (the association
failures hold the whole destination). ``verify`` is a C-ECHO.

TLS (``tls: true``): the PACS certificate is verified against ``tls_ca`` (or the system store) and its host name;
``tls_cert`` / ``tls_key`` are our client certificate when the PACS asks for one.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node import config
from node.egress.destinations import Outcome, SendSettings
from node.egress.outbox import OutboxItem
from node.tcp import no_delay

log = logging.getLogger(__name__)

# C-STORE warning statuses (PS3.4 B.2.3, PS3.7 C): the instance is stored.
_WARNING_STATUSES = {0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007}
_VERIFICATION = "1.2.840.10008.1.1"
_MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2)


class CStore:
    kind = "dicom"

    def __init__(self, cfg: config.DicomDestination, settings: SendSettings) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.settings = settings
        self.target = cfg.target
        self.audit: Mapping[str, Any] = {"tls": cfg.tls}

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The client-side TLS context (certificate and host name verified), or None without TLS."""
        c = self.cfg
        if not c.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(c.tls_ca) if c.tls_ca else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if c.tls_cert:
            ctx.load_cert_chain(str(c.tls_cert), str(c.tls_key) if c.tls_key else None)
        return ctx

    def _associate(self, contexts: list[tuple[str, list[str]]]) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.settings.calling_ae)
        t = self.settings.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t
        ae.connection_timeout = min(t, 10.0)
        for cls, syntaxes in contexts:
            ae.add_requested_context(cls, syntaxes)
        ctx = self._ssl_context()
        assoc = ae.associate(
            self.cfg.host,
            self.cfg.port,
            ae_title=self.cfg.ae_title,
            tls_args=None if ctx is None else (ctx, self.cfg.host),
        )
        if assoc.is_established:
            no_delay(assoc)
        return assoc

    def send(self, items: Sequence[OutboxItem]) -> Iterator[Outcome]:
        # One presentation context per SOP class (at most 128 per association), each with the files' syntaxes;
        # instances of further classes get no outcome and wait for the next pass.
        by_class: dict[str, set[str]] = {}
        for it in items:
            by_class.setdefault(it.sop_class_uid, set()).add(it.transfer_syntax_uid)
        classes = sorted(by_class)[:_MAX_CONTEXTS]
        todo = [it for it in items if it.sop_class_uid in classes]
        contexts = [(c, sorted(by_class[c] | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})) for c in classes]
        try:
            assoc = self._associate(contexts)
        except Exception as e:  # bad host name, TLS files ...
            yield from _all_retry(todo, f"cannot connect: {type(e).__name__}: {e}")
            return
        if not assoc.is_established:
            why = (
                "association rejected by" if assoc.is_rejected else "no association (PACS unreachable or aborted) with"
            )
            yield from _all_retry(todo, f"{why} {self.target}")
            return
        try:
            for n, it in enumerate(todo):
                if not assoc.is_established:
                    yield from _all_retry(todo[n:], "association lost while sending")
                    return
                yield self._store(assoc, it)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc: Any, it: OutboxItem) -> Outcome:
        try:
            ds = pydicom.dcmread(it.path)
        except Exception as e:
            return Outcome(it, "failed", f"job {it.job_id}: cannot read {it.path}: {type(e).__name__}: {e}")
        try:
            status = assoc.send_c_store(ds)
        except Exception as e:
            return Outcome(it, "retry", f"C-STORE failed: {type(e).__name__}: {e}")
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None:
            return Outcome(it, "retry", "no C-STORE response (connection lost or timed out)")
        if code == 0x0000 or code in _WARNING_STATUSES:
            if code:
                log.info(
                    "job %s: %s stored by %s with warning status 0x%04X",
                    it.job_id,
                    it.sop_instance_uid,
                    self.name,
                    code,
                )
            return Outcome(it, "sent")
        comment = str(status.get("ErrorComment", "") or "")
        return Outcome(it, "retry", f"C-STORE status 0x{code:04X}" + (f" ({comment})" if comment else ""))

    def verify(self) -> str | None:
        try:
            assoc = self._associate([(_VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        except Exception as e:
            return f"C-ECHO: {type(e).__name__}: {e}"
        if not assoc.is_established:
            return "C-ECHO: " + ("association rejected" if assoc.is_rejected else "PACS unreachable (no association)")
        try:
            status = assoc.send_c_echo()
        finally:
            assoc.release()
        ok = status is not None and "Status" in status and int(status.Status) == 0
        return None if ok else "C-ECHO failed"


def _all_retry(items: Sequence[OutboxItem], error: str) -> Iterator[Outcome]:
    for it in items:
        yield Outcome(it, "retry", error, destination_down=True)


DESTINATION = CStore
