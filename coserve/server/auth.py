"""Tenants: API keys -> (tenant, role), and per-tenant rate limits.

Keys come from a keys file (YAML or JSON) and/or the COSERVE_API_KEYS environment variable.
Only their sha256 is kept in memory; the file may hold hashes instead of keys. The file is
re-read when it changes (checked on every request), so a revoked key fails on its next
request. With no keys at all the server runs open: every caller is tenant `default`, admin.

Keys file:
    keys:
      - key: sk-acme-1                 # or key_sha256: <64 hex digits>
        tenant: acme                   # [A-Za-z0-9_-], 1-64 characters
        role: user                     # user | admin
        rate_limit_rps: 20             # optional, overrides --rate-limit-rps for this tenant
COSERVE_API_KEYS: "KEY=TENANT[:ROLE],KEY=TENANT[:ROLE],..."
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger("coserve.server")

TENANT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ROLES = ("user", "admin")
OPEN_TENANT = "default"


class KeysError(ValueError):
    pass


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str  # user | admin
    rate_limit_rps: float | None = None  # this tenant's override of the server-wide limit

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _entry(raw: dict, where: str) -> tuple[str, Principal]:
    if not isinstance(raw, dict):
        raise KeysError(f"{where}: each key must be a mapping")
    unknown = set(raw) - {"key", "key_sha256", "tenant", "role", "rate_limit_rps"}
    if unknown:
        raise KeysError(f"{where}: unknown fields {sorted(unknown)}")
    digest = raw.get("key_sha256") or (hash_key(str(raw["key"])) if raw.get("key") else None)
    if not digest or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise KeysError(f"{where}: needs `key` or a 64-hex-digit `key_sha256`")
    tenant, role = str(raw.get("tenant", "")), str(raw.get("role", "user"))
    if not TENANT.match(tenant):
        raise KeysError(f"{where}: tenant {tenant!r} must be 1-64 of A-Z a-z 0-9 _ -")
    if role not in ROLES:
        raise KeysError(f"{where}: role must be one of {ROLES}")
    rps = raw.get("rate_limit_rps")
    return digest, Principal(tenant, role, float(rps) if rps is not None else None)


def parse_keys_file(path: Path) -> dict[str, Principal]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise KeysError(f"{path}: not YAML/JSON: {exc}") from exc
    entries = data.get("keys", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeysError(f"{path}: expected a mapping with a `keys` list")
    return dict(_entry(e, f"{path} keys[{i}]") for i, e in enumerate(entries))


def parse_keys_env(value: str) -> dict[str, Principal]:
    keys = {}
    for i, item in enumerate(p.strip() for p in value.split(",") if p.strip()):
        key, sep, who = item.partition("=")
        tenant, _, role = who.partition(":")
        if not sep or not key:
            raise KeysError(f"COSERVE_API_KEYS item {i}: expected KEY=TENANT[:ROLE]")
        digest, principal = _entry({"key": key, "tenant": tenant, "role": role or "user"}, f"COSERVE_API_KEYS[{i}]")
        keys[digest] = principal
    return keys


class KeyRing:
    """sha256(key) -> Principal, from a file that is re-read when it changes and an environment string."""

    def __init__(self, keys_file: str | Path | None = None, env_keys: str | None = None):
        self.keys_file = Path(keys_file) if keys_file else None
        self._env = parse_keys_env(env_keys) if env_keys else {}
        self._file: dict[str, Principal] = {}
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        self._reload(strict=True)

    def _reload(self, strict: bool = False) -> None:
        if self.keys_file is None:
            return
        try:
            st = os.stat(self.keys_file)
        except FileNotFoundError:
            if strict:
                raise KeysError(f"keys file {self.keys_file} does not exist") from None
            self._file, self._stamp = {}, None  # deleted: every key in it is revoked
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            self._file = parse_keys_file(self.keys_file)
        except KeysError as exc:
            if strict:
                raise
            log.error("keys file not reloaded, keeping the previous keys: %s", exc)
        self._stamp = stamp

    @property
    def open(self) -> bool:
        return self.keys_file is None and not self._env

    def lookup(self, key: str | None) -> Principal | None:
        """The caller of `key`, or None when it is missing, unknown or revoked."""
        if self.open:
            return Principal(OPEN_TENANT, "admin")
        if not key:
            return None
        with self._lock:
            self._reload()
            digest = hash_key(key)
            return self._file.get(digest) or self._env.get(digest)

    def count(self) -> int:
        return len(self._file) + len(self._env)


class RateLimiter:
    """A token bucket per tenant: `rps` requests a second on average, bursts of `burst`."""

    def __init__(self, rps: float, burst: int):
        self.rps, self.burst = rps, max(1, burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, tenant: str, rps: float | None = None) -> float | None:
        """Take one token; None if allowed, else the seconds until one is available."""
        rate = self.rps if rps is None else rps
        if rate <= 0:
            return None
        burst = self.burst
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(tenant, (float(burst), now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return None
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / rate


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
