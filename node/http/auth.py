"""Who is asking: console users (argon2 password hashes), bearer tokens (SHA-256), login sessions, CSRF tokens.

- **Passwords** are verified with argon2 (:func:`hash_password` makes the hash for the YAML). An unknown user name
  costs the same argon2 verification as a wrong password, and every name is compared in constant time, so the
  answer's timing does not tell which of the two was wrong. A verified (name, password) pair is remembered for a
  few minutes (keyed by an HMAC under a per-process key), so a script sending basic credentials with every call
  does not pay argon2's memory and time each time.
- **Tokens**: only their SHA-256 is configured; the digest of the presented token is compared with every
  configured digest in constant time.
- **Sessions** (the login form): a random id in an ``HttpOnly``, ``SameSite=Strict`` cookie, kept in memory (a
  restart logs everybody out), each with its own CSRF token that every form posts back.
- **Throttling**: after :data:`MAX_FAILURES` failed logins from one address within :data:`FAILURE_WINDOW_S`, that
  address is refused (429) until the window has passed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from node.config import HttpSettings

ROLES = ("viewer", "operator")  # in order of power
MAX_FAILURES = 10
FAILURE_WINDOW_S = 300.0
_CACHE_S = 300.0


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``via`` is ``session``, ``basic`` or ``bearer``; ``csrf`` the session's token."""

    name: str
    role: str
    via: str
    csrf: str | None = None
    session: str | None = None

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass
class _Session:
    principal: Principal
    expires: float


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` for ``node.http.users[].password_hash``."""
    from argon2 import PasswordHasher

    if not password:
        raise ValueError("an empty password cannot be hashed")
    return PasswordHasher().hash(password)


def token_digest(token: str) -> str:
    """The SHA-256 (hex) of a bearer token, as ``node.http.tokens[].sha256`` holds it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "rn_" + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, settings: HttpSettings) -> None:
        from argon2 import PasswordHasher

        self.settings = settings
        self._hasher = PasswordHasher()
        self._users = [(u.name.encode("utf-8"), u.password_hash.get_secret_value(), u.role) for u in settings.users]
        self._tokens = [(bytes.fromhex(t.sha256), t.name, t.role) for t in settings.tokens]
        # an unknown user name is verified against this, made with the first user's argon2 parameters, so it takes
        # as long as a wrong password
        self._dummy = self._dummy_hash()
        self._key = secrets.token_bytes(32)
        self._verified: dict[bytes, tuple[float, Principal]] = {}
        self._sessions: dict[str, _Session] = {}
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self.clock = time.monotonic  # tests move it

    def _dummy_hash(self) -> str:
        from argon2 import PasswordHasher, extract_parameters
        from argon2.exceptions import InvalidHashError

        hasher = self._hasher
        if self._users:
            try:
                hasher = PasswordHasher.from_parameters(extract_parameters(self._users[0][1]))
            except (InvalidHashError, ValueError):
                pass
        return hasher.hash(secrets.token_urlsafe(16))

    # ---- passwords and tokens ------------------------------------------------------------------------------------
    def check_password(self, name: str, password: str) -> Principal | None:
        """The user, when ``name`` and ``password`` match a configured user; else None (same work either way)."""
        from argon2.exceptions import Argon2Error, InvalidHashError

        key = hmac.new(self._key, name.encode("utf-8") + b"\0" + password.encode("utf-8"), "sha256").digest()
        now = self.clock()
        with self._lock:
            hit = self._verified.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        wanted = name.encode("utf-8")
        found: tuple[str, str] | None = None
        for user, pw_hash, role in self._users:  # every name compared, in constant time
            if hmac.compare_digest(user, wanted) and found is None:
                found = (pw_hash, role)
        try:
            ok = self._hasher.verify(found[0] if found else self._dummy, password) and found is not None
        except (Argon2Error, InvalidHashError):
            ok = False
        if not ok or found is None:
            return None
        p = Principal(name, found[1], "basic")
        with self._lock:
            if len(self._verified) > 1000:
                self._verified.clear()
            self._verified[key] = (now + _CACHE_S, p)
        return p

    def check_token(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Principal | None = None
        for want, name, role in self._tokens:  # every digest compared, in constant time
            if hmac.compare_digest(want, digest) and found is None:
                found = Principal(name, role, "bearer")
        return found

    # ---- sessions ------------------------------------------------------------------------------------------------
    def open_session(self, user: Principal) -> Principal:
        sid = secrets.token_urlsafe(32)
        p = Principal(user.name, user.role, "session", csrf=secrets.token_urlsafe(32), session=sid)
        with self._lock:
            now = self.clock()
            for k in [k for k, s in self._sessions.items() if s.expires <= now]:
                del self._sessions[k]
            self._sessions[sid] = _Session(p, now + self.settings.session_hours * 3600)
        return p

    def session(self, sid: str) -> Principal | None:
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            if s.expires <= self.clock():
                del self._sessions[sid]
                return None
            return s.principal

    def close_session(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    # ---- throttling ----------------------------------------------------------------------------------------------
    def note_failure(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            times = [t for t in self._failures.get(address, []) if t > now - FAILURE_WINDOW_S]
            times.append(now)
            self._failures[address] = times[-MAX_FAILURES:]
            if len(self._failures) > 10000:  # a flood of addresses: forget the oldest half
                for k in list(self._failures)[:5000]:
                    del self._failures[k]

    def blocked_for(self, address: str) -> float:
        """Seconds ``address`` must wait before the next login attempt (0: it may try now)."""
        now = self.clock()
        with self._lock:
            times = [t for t in self._failures.get(address, []) if t > now - FAILURE_WINDOW_S]
        if len(times) < MAX_FAILURES:
            return 0.0
        return max(0.0, times[0] + FAILURE_WINDOW_S - now)


def same_token(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two CSRF tokens (False when either is missing)."""
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
