"""``kind: dicomweb``: STOW-RS to a DICOMweb server (``dicomweb-client`` over ``requests``).

Exactly once per SOP Instance UID: before storing, each series' instances already on the server are asked for
with QIDO-RS (``studies/{study}/series/{series}/instances``) and counted as sent without being posted again, so a
retry after a partial failure, a crash between the POST and the outbox update, or an operator's resend never
stores an instance twice. (A server without QIDO-RS answers that query with an error; then the STOW-RS response
alone decides.) Instances are posted per study, in requests of at most ``_BATCH_INSTANCES`` instances and about
``_BATCH_BYTES``; the response's ReferencedSOPSequence marks each stored one sent, its FailedSOPSequence says why
one was not (out of resources and processing failures are retried, "already stored" counts as sent, anything else
fails with the reason code).

No answer (connection refused, timeout, TLS failure) and HTTP 5xx / 408 / 429 hold the whole destination for the
sender's backoff; any other HTTP 4xx is permanent for the instances of that request, with the status and what to
fix (URL, token, permissions). ``verify`` is ``GET {url}/studies?limit=1``.

The auth header's value (``auth_token`` or the file ``auth_token_file``, read for every pass so a rotated token is
picked up) goes into the session headers only, never into a log line or an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from node import config
from node.egress.destinations import Outcome, SendSettings, State
from node.egress.outbox import OutboxItem

if TYPE_CHECKING:
    from dicomweb_client import DICOMwebClient

log = logging.getLogger(__name__)

_BATCH_INSTANCES = 50
_BATCH_BYTES = 64 << 20
_SOP_INSTANCE_UID = "00080018"
# FailureReason (PS3.18 table I.2-1, PS3.4 annex GG): transient ones are retried, 0x0111 means "already there".
_DUPLICATE = 0x0111
_TRANSIENT = {0x0110, 0x0213}  # processing failure, resource limitation
_RETRY_HTTP = {408, 429}  # plus every 5xx: the server may take it later
_HTTP_HINTS = {
    400: "the server could not use the request",
    401: "the server wants credentials: set auth_token (or auth_token_file) and auth_header",
    403: "the credentials may not store here: check the token's permissions on the server",
    404: "no DICOMweb service at this address: url must be the server's DICOMweb root, e.g. "
    "https://host/dicom-web (Orthanc: http://host:8042/dicom-web)",
    405: "this address does not take STOW-RS: check url (the DICOMweb root) and that the server allows storing",
    413: "the request is too large for the server",
    415: "the server does not accept application/dicom",
}


class StowRS:
    kind = "dicomweb"

    def __init__(self, cfg: config.DicomwebDestination, settings: SendSettings) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.target = cfg.url
        self.timeout_s = cfg.timeout_s or settings.timeout_s
        self.audit: Mapping[str, Any] = {"tls": cfg.url.startswith("https://")}

    def _client(self) -> DICOMwebClient:
        import requests
        from dicomweb_client import DICOMwebClient

        c = self.cfg
        session = requests.Session()
        session.verify = str(c.tls_ca) if c.tls_ca else c.tls_verify
        if c.tls_cert:
            session.cert = (str(c.tls_cert), str(c.tls_key)) if c.tls_key else str(c.tls_cert)
        token = (
            c.auth_token.get_secret_value()
            if c.auth_token
            else c.auth_token_file.read_text().strip()
            if c.auth_token_file
            else None
        )
        client = DICOMwebClient(
            c.url,
            session=session,
            headers={c.auth_header: token} if token else None,
            timeout=self.timeout_s,
            chunk_size=1 << 40,
        )  # one body, no chunked encoding
        client.set_http_retry_params(retry=False)  # the sender's backoff retries, not a sleep in this thread
        return client

    # ---- sending -------------------------------------------------------------------------------------------------
    def send(self, items: Sequence[OutboxItem]) -> Iterator[Outcome]:
        import requests

        series: dict[tuple[str, str], list[OutboxItem]] = {}
        for it in items:
            try:
                ds = pydicom.dcmread(
                    it.path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID"]
                )
                key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
            except Exception as e:
                yield Outcome(it, "failed", f"job {it.job_id}: cannot read {it.path}: {type(e).__name__}: {e}")
                continue
            series.setdefault(key, []).append(it)
        try:
            client = self._client()
        except OSError as e:  # the token file went away
            yield from _all(
                [it for group in series.values() for it in group],
                "retry",
                f"cannot read auth_token_file: {e.strerror or e}",
            )
            return
        pending: dict[str, list[OutboxItem]] = {}  # study -> instances to post
        keys = list(series)
        for k, (study, series_uid) in enumerate(keys):
            group = series[(study, series_uid)]
            try:
                present = self._stored(client, study, series_uid)
            except requests.exceptions.RequestException as e:  # down: nothing of this pass is posted
                rest = [it for g in pending.values() for it in g] + [it for key in keys[k:] for it in series[key]]
                yield from _all(rest, "retry", self._unreachable(e), down=True)
                return
            for it in group:
                if it.sop_instance_uid in present:
                    log.info("job %s: %s already on %s; not posted again", it.job_id, it.sop_instance_uid, self.name)
                    yield Outcome(it, "sent")
                else:
                    pending.setdefault(study, []).append(it)
        batches = [(study, batch) for study, group in pending.items() for batch in _batches(group)]
        for n, (study, batch) in enumerate(batches):
            outcomes, down = self._post(client, study, batch)
            yield from outcomes
            if down:  # the server is gone: the rest waits for the sender's backoff
                yield from _all(
                    [it for _, b in batches[n + 1 :] for it in b], "retry", outcomes[-1].error or "", down=True
                )
                return

    def _stored(self, client: DICOMwebClient, study: str, series_uid: str) -> set[str]:
        """SOP Instance UIDs of the series the server has; empty when it cannot say (no QIDO-RS)."""
        import requests

        try:
            found = client.search_for_instances(
                study_instance_uid=study, series_instance_uid=series_uid, fields=["SOPInstanceUID"]
            )
        except requests.exceptions.HTTPError as e:
            log.debug("destination %s: QIDO-RS not answered (%s); the STOW-RS response decides", self.name, e)
            return set()
        return {str(v) for r in found for v in r.get(_SOP_INSTANCE_UID, {}).get("Value", [])}

    def _post(self, client: DICOMwebClient, study: str, batch: list[OutboxItem]) -> tuple[list[Outcome], bool]:
        """POST one batch; (its outcomes, whether the server itself is down)."""
        import requests

        outcomes: list[Outcome] = []
        datasets, todo = [], []
        for it in batch:
            try:
                datasets.append(pydicom.dcmread(it.path))
                todo.append(it)
            except Exception as e:
                outcomes.append(
                    Outcome(it, "failed", f"job {it.job_id}: cannot read {it.path}: {type(e).__name__}: {e}")
                )
        if not todo:
            return outcomes, False
        try:
            answer = client.store_instances(datasets, study_instance_uid=study)
        except requests.exceptions.HTTPError as e:
            response = e.response
            status = response.status_code if response is not None else 0
            if status == 409 and response is not None:  # none (or not all) stored: the body says which and why
                return outcomes + self._read_answer(todo, _json_dataset(response)), False
            error = self._http_error("STOW-RS", status, response)
            if status >= 500 or status in _RETRY_HTTP:
                return outcomes + list(_all(todo, "retry", error, down=True)), True
            return outcomes + list(_all(todo, "failed", error)), False
        except requests.exceptions.RequestException as e:
            return outcomes + list(_all(todo, "retry", self._unreachable(e), down=True)), True
        return outcomes + self._read_answer(todo, answer), False

    def _read_answer(self, todo: list[OutboxItem], answer: pydicom.Dataset | None) -> list[Outcome]:
        """Per instance, what the STOW-RS response says about it."""
        if answer is None or (not answer.get("ReferencedSOPSequence") and not answer.get("FailedSOPSequence")):
            # 200 with no body: stored (PS3.18 wants the body, some servers omit it on success)
            return (
                [Outcome(it, "sent") for it in todo]
                if answer is not None
                else list(_all(todo, "retry", "the server's STOW-RS answer could not be read"))
            )
        stored = {str(r.get("ReferencedSOPInstanceUID", "")) for r in answer.get("ReferencedSOPSequence", [])}
        failed = {
            str(r.get("ReferencedSOPInstanceUID", "")): int(r.get("FailureReason", 0) or 0)
            for r in answer.get("FailedSOPSequence", [])
        }
        out = []
        for it in todo:
            uid = it.sop_instance_uid
            if uid in stored:
                out.append(Outcome(it, "sent"))
            elif uid not in failed:
                out.append(Outcome(it, "retry", "STOW-RS: the server's answer does not mention this instance"))
            elif failed[uid] == _DUPLICATE:
                log.info("job %s: %s already stored on %s", it.job_id, uid, self.name)
                out.append(Outcome(it, "sent"))
            elif failed[uid] in _TRANSIENT or 0xA700 <= failed[uid] <= 0xA7FF:
                out.append(
                    Outcome(
                        it,
                        "retry",
                        f"STOW-RS: not stored now, FailureReason 0x{failed[uid]:04X} "
                        f"(out of resources or processing failure)",
                    )
                )
            else:
                out.append(
                    Outcome(
                        it,
                        "failed",
                        f"STOW-RS: {self.name} refused {uid}: FailureReason "
                        f"0x{failed[uid]:04X} (e.g. 0xA900: does not match its SOP class, "
                        "0xC000: cannot understand, 0x0122: SOP class not supported)",
                    )
                )
        return out

    # ---- errors and the check -------------------------------------------------------------------------------------
    def _unreachable(self, e: Exception) -> str:
        return f"cannot reach {self.cfg.url}: {type(e).__name__}: {_short(str(e))}"

    def _http_error(self, what: str, status: int, response: Any) -> str:
        reason = getattr(response, "reason", "") or ""
        body = _short(getattr(response, "text", "") or "")
        hint = _HTTP_HINTS.get(status, "the server is failing; it is retried" if status >= 500 else "")
        return (
            f"{what}: HTTP {status} {reason} from {self.cfg.url}"
            + (f": {hint}" if hint else "")
            + (f" (server said: {body})" if body else "")
        )

    def verify(self) -> str | None:
        import requests

        try:
            self._client().search_for_studies(limit=1)
        except requests.exceptions.HTTPError as e:
            response = e.response
            return self._http_error("QIDO-RS", response.status_code if response is not None else 0, response)
        except requests.exceptions.RequestException as e:
            return self._unreachable(e)
        except OSError as e:
            return f"cannot read auth_token_file: {e.strerror or e}"
        return None


def _all(items: Sequence[OutboxItem], state: State, error: str, *, down: bool = False) -> Iterator[Outcome]:
    for it in items:
        yield Outcome(it, state, error, destination_down=down)


def _batches(items: list[OutboxItem]) -> Iterator[list[OutboxItem]]:
    """At most ``_BATCH_INSTANCES`` instances and about ``_BATCH_BYTES`` per request (one instance may exceed it)."""
    batch: list[OutboxItem] = []
    size = 0
    for it in items:
        n = Path(it.path).stat().st_size
        if batch and (len(batch) >= _BATCH_INSTANCES or size + n > _BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(it)
        size += n
    if batch:
        yield batch


def _json_dataset(response: Any) -> pydicom.Dataset | None:
    try:
        return pydicom.Dataset.from_json(response.json())
    except Exception:  # noqa: BLE001 - not DICOM JSON: the caller says so
        return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


DESTINATION = StowRS
