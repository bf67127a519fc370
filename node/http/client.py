"""The console's API from the command line (``recon-node status --url``): urllib, no extra dependency.

Credentials: a bearer token (``--token`` or ``RECON_NODE_TOKEN``) or a user (``--user`` or ``RECON_NODE_USER``)
whose password comes from ``RECON_NODE_PASSWORD`` or a prompt. ``--ca`` names the CA that signed the console's
certificate (default: the system's store).
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode, urlsplit


def _auth_header(user: str | None, token: str | None) -> str:
    token = token or os.environ.get("RECON_NODE_TOKEN")
    if token:
        return f"Bearer {token}"
    user = user or os.environ.get("RECON_NODE_USER")
    if not user:
        raise ValueError("the console needs credentials: --token (or RECON_NODE_TOKEN) or --user (or RECON_NODE_USER)")
    password = os.environ.get("RECON_NODE_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise ValueError(f"no password for {user}: set RECON_NODE_PASSWORD or run in a terminal to be asked")
        password = getpass.getpass(f"password for {user}: ")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def get_json(
    base_url: str,
    path: str,
    query: dict[str, Any] | None = None,
    *,
    user: str | None = None,
    token: str | None = None,
    ca: str | None = None,
    timeout: float = 30.0,
) -> Any:
    """GET ``path`` of the console at ``base_url`` and parse the JSON; ``ValueError`` with a sentence on failure."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--url {base_url!r}: give the console's address, e.g. https://recon-node:8443")
    if parts.username or parts.password:
        raise ValueError("--url: put the user in --user and the password in RECON_NODE_PASSWORD, not in the URL")
    q = {k: v for k, v in (query or {}).items() if v not in (None, False, "")}
    url = base_url.rstrip("/") + path + (f"?{urlencode(q)}" if q else "")
    req = urllib.request.Request(
        url, headers={"Authorization": _auth_header(user, token), "Accept": "application/json"}
    )
    ctx = None
    if parts.scheme == "https":
        ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    elif ca:
        raise ValueError("--ca is for an https:// console")
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read().decode("utf-8")).get("error", "")
        except (ValueError, AttributeError, OSError):
            detail = ""
        if e.code == 401:
            raise ValueError(f"{base_url}: not signed in ({detail or 'wrong user, password or token'})") from None
        if e.code == 403:
            raise ValueError(f"{base_url}: not allowed ({detail})") from None
        raise ValueError(f"{base_url}: the console answered {e.code} {detail or e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise ValueError(
                f"{base_url}: the console's certificate is not trusted ({reason.verify_message}); give its CA with --ca"
            ) from None
        raise ValueError(f"{base_url}: cannot reach the console ({reason})") from None


def fetch_status(
    base_url: str,
    *,
    state: str | None = None,
    limit: int | None = None,
    log: bool = False,
    user: str | None = None,
    token: str | None = None,
    ca: str | None = None,
) -> dict[str, Any]:
    """``/api/jobs``: counts, node, destinations and jobs, the shape ``recon-node status --json`` prints."""
    out: dict[str, Any] = get_json(
        base_url,
        "/api/jobs",
        {"state": state, "limit": limit, "log": "1" if log else None},
        user=user,
        token=token,
        ca=ca,
    )
    return out
