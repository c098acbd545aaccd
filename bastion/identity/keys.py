"""API keys and virtual keys: secrets handed to agents, stored only as hashes.

A secret reads ``bst_<key id>_<random>``. The key id is public (it is how a key
is found, listed and revoked); the file stores ``sha256:<hex>`` of the whole
secret. A plain SHA-256 is enough because the random part carries 256 bits of
entropy: there is nothing to brute-force that a slow hash would protect.

Key file reload policy: the file is re-read when its mtime, size or inode change
(checked at most every ``check_interval`` seconds, and at once when an unknown
key id is presented). If the new content is unreadable or invalid, the last good
version stays in force and the error is logged at ERROR level and kept in
:attr:`KeyStore.last_error`; an empty document counts as invalid (a truncated
write must not revoke every key). If there never was a good version, key
authentication is refused with 503. Consequence to know: a revocation written
together with a syntax error does not take effect until the file is fixed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bastion.errors import AuthError, IdentityUnavailable
from bastion.events import Identity
from bastion.identity.config import KeyEntry, KeyFile

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "KeyStore",
    "VirtualKey",
    "check_model_access",
    "generate_secret",
    "hash_secret",
    "parse_key_id",
]

log = logging.getLogger("bastion.identity.keys")

DEFAULT_KEY_PREFIX = "bst_"
_KEY_ID_RE = re.compile(r"[a-z0-9]{6,32}")
_RANDOM_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
# Compared against when the key id is unknown, so a miss costs what a hit does.
_DUMMY_HASH = "sha256:" + "0" * 64


def hash_secret(secret: str) -> str:
    """The stored form of a key secret: ``sha256:<64 hex>``."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_secret(prefix: str = DEFAULT_KEY_PREFIX) -> tuple[str, str]:
    """A fresh ``(key_id, secret)``; show the secret once, store only its hash."""
    key_id = secrets.token_hex(6)
    return key_id, f"{prefix}{key_id}_{secrets.token_urlsafe(32)}"


def parse_key_id(secret: str, prefix: str = DEFAULT_KEY_PREFIX) -> str | None:
    """The key id inside a well-formed secret, else None."""
    if not secret.startswith(prefix):
        return None
    key_id, sep, random_part = secret[len(prefix) :].partition("_")
    if not sep or not _KEY_ID_RE.fullmatch(key_id) or not _RANDOM_RE.fullmatch(random_part):
        return None
    return key_id


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class VirtualKey:
    """A verified API or virtual key: whom it stands for and what it may reach.

    ``providers`` and ``models`` are globs; an empty list allows nothing, so a
    key must be granted models explicitly before it can be used for an LLM call.
    """

    key_id: str
    kind: str
    identity: Identity
    providers: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    expires_at: float | None = None
    revoked: bool = False
    description: str = ""
    hash: str = field(default=_DUMMY_HASH, repr=False)

    @classmethod
    def from_entry(cls, entry: KeyEntry) -> VirtualKey:
        identity = Identity(
            subject=entry.subject,
            groups=tuple(entry.groups),
            roles=tuple(entry.roles),
            email=entry.email,
            tenant=entry.tenant,
            key_id=entry.id,
            scopes=tuple(entry.scopes),
            auth_method="virtual_key" if entry.kind == "virtual" else "api_key",
            attributes=_freeze(dict(entry.attributes)),
        )
        return cls(
            key_id=entry.id,
            kind=entry.kind,
            identity=identity,
            providers=tuple(entry.providers),
            models=tuple(entry.models),
            expires_at=entry.expires.timestamp() if entry.expires else None,
            revoked=entry.revoked,
            description=entry.description,
            hash=entry.hash,
        )

    def is_expired(self, now: float | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at

    def allows_provider(self, provider: str | None) -> bool:
        """True when some provider glob matches (a None provider needs ``*``)."""
        name = provider if provider is not None else ""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.providers)

    def allows_model(self, provider: str | None, model: str) -> bool:
        """True when this key may reach ``model`` at ``provider``.

        A model glob may also name the provider, ``openai/gpt-4o*``, to grant a
        model only at that provider.
        """
        if not self.allows_provider(provider):
            return False
        qualified = f"{provider}/{model}" if provider else model
        for pattern in self.models:
            if "/" in pattern:
                if provider and fnmatch.fnmatchcase(qualified, pattern):
                    return True
            elif fnmatch.fnmatchcase(model, pattern):
                return True
        return False

    def check_model(self, provider: str | None, model: str) -> None:
        """Raise ``AuthError`` (403, ``model_not_allowed``) unless :meth:`allows_model`."""
        if not self.allows_model(provider, model):
            where = f" at provider {provider!r}" if provider else ""
            raise AuthError(
                f"key {self.key_id} may not use model {model!r}{where}",
                status=403,
                code="model_not_allowed",
            )


def check_model_access(key: VirtualKey | None, provider: str | None, model: str) -> None:
    """Enforce a virtual key's model grant; no key (JWT, anonymous) means no key limit."""
    if key is not None:
        key.check_model(provider, model)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    keys: Mapping[str, VirtualKey]
    signature: tuple[int, int, int] | None


class KeyStore:
    """Hashed keys from a YAML key file and/or given programmatically.

    :meth:`authenticate` is synchronous and cheap (a stat at most every
    ``check_interval`` seconds, one SHA-256, one dict lookup, one constant-time
    compare); it is safe to call from several threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        entries: Iterable[KeyEntry] = (),
        *,
        check_interval: float = 1.0,
        prefix: str = DEFAULT_KEY_PREFIX,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.check_interval = check_interval
        self.prefix = prefix
        self.last_error: str | None = None
        self._static = {e.id: VirtualKey.from_entry(e) for e in entries}
        self._snapshot: _Snapshot | None = None if self.path else _Snapshot(self._static, None)
        self._next_check = 0.0
        self._bad_signature: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        if self.path is not None:
            self.reload()

    @property
    def ready(self) -> bool:
        """True once a good version of the keys is loaded."""
        return self._snapshot is not None

    def keys(self) -> list[VirtualKey]:
        """Every loaded key (revoked and expired ones included)."""
        self._maybe_reload()
        return list(self._snapshot.keys.values()) if self._snapshot else []

    def add(self, entry: KeyEntry) -> VirtualKey:
        """Register a key programmatically (kept across file reloads)."""
        key = VirtualKey.from_entry(entry)
        with self._lock:
            self._static[entry.id] = key
            snap = self._snapshot
            if snap is not None:
                merged = dict(snap.keys)
                merged[entry.id] = key
                self._snapshot = _Snapshot(types.MappingProxyType(merged), snap.signature)
        return key

    def authenticate(self, secret: str) -> VirtualKey:
        """The key this secret belongs to, or ``AuthError`` (401) / ``IdentityUnavailable`` (503)."""
        key_id = parse_key_id(secret, self.prefix)
        if key_id is None:
            raise AuthError("malformed API key", code="invalid_key")
        self._maybe_reload()
        snap = self._snapshot
        key = snap.keys.get(key_id) if snap else None
        if key is None and self.path is not None:
            # A key created a moment ago should work at once: look at the file now.
            self.reload()
            snap = self._snapshot
            key = snap.keys.get(key_id) if snap else None
        if snap is None:
            raise IdentityUnavailable("API keys are unavailable: the key file could not be loaded")
        presented = hash_secret(secret)
        if not hmac.compare_digest(presented, key.hash if key else _DUMMY_HASH) or key is None:
            raise AuthError("invalid API key", code="invalid_key")
        if key.revoked:
            raise AuthError(f"key {key_id} is revoked", code="key_revoked")
        if key.is_expired():
            raise AuthError(f"key {key_id} has expired", code="key_expired")
        return key

    def _maybe_reload(self) -> None:
        if self.path is not None and time.monotonic() >= self._next_check:
            self.reload()

    def reload(self) -> bool:
        """Re-read the key file if it changed; True when a new version was loaded."""
        if self.path is None:
            return False
        with self._lock:
            self._next_check = time.monotonic() + self.check_interval
            try:
                st = os.stat(self.path)
            except OSError as exc:
                self._fail(f"cannot stat key file {self.path}: {exc.strerror or exc}")
                return False
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._snapshot is not None and self._snapshot.signature == signature:
                return False
            if signature == self._bad_signature:
                return False
            try:
                text = self.path.read_text(encoding="utf-8")
                data = yaml.safe_load(text)
                if data is None:
                    raise ValueError("the key file is empty")
                parsed = KeyFile.model_validate(data)
            except (
                OSError,
                UnicodeDecodeError,
                yaml.YAMLError,
                ValidationError,
                ValueError,
            ) as exc:
                self._bad_signature = signature
                self._fail(f"invalid key file {self.path}: {_short(exc)}")
                return False
            merged = {e.id: VirtualKey.from_entry(e) for e in parsed.keys}
            clash = merged.keys() & self._static.keys()
            if clash:
                self._bad_signature = signature
                self._fail(f"key file {self.path} redefines programmatic keys {sorted(clash)}")
                return False
            merged.update(self._static)
            self._snapshot = _Snapshot(types.MappingProxyType(merged), signature)
            self.last_error = None
            self._bad_signature = None
            log.info("loaded %d keys from %s", len(parsed.keys), self.path)
            return True

    def _fail(self, message: str) -> None:
        if message == self.last_error:
            return
        self.last_error = message
        if self._snapshot is None:
            log.error("%s; key authentication is refused until it is fixed", message)
        else:
            log.error("%s; still serving the last good version", message)


def _short(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        return f"{where}: {first['msg']} ({exc.error_count()} error(s))"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
