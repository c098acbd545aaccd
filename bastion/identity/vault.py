"""Provider-key custody: the upstream keys live here and nowhere else.

A request takes one :class:`ProviderKey` from the vault when it starts and uses
that object to the end, so a rotation (secrets file rewritten, environment
variable changed) applies to the next request without touching the ones in
flight. A key's secret is reachable only through :meth:`ProviderKey.reveal` and
:meth:`ProviderKey.apply`; ``repr``/``str``/logs show its fingerprint.

Secrets file (YAML)::

    providers:
      openai: sk-...                       # a plain string
      anthropic: {key: sk-ant-..., kind: anthropic}

Reload policy mirrors the key file: an unreadable or invalid secrets file keeps
the last good version (logged at ERROR); with no good version, keys that only the
file provides are unavailable (``UpstreamError`` 503), while environment
variables still work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from bastion.errors import UpstreamError
from bastion.identity.config import ProviderKind, ProviderSource, VaultConfig

__all__ = ["CREDENTIAL_HEADERS", "ProviderKey", "ProviderKeyVault", "fingerprint"]

log = logging.getLogger("bastion.identity.vault")

# Whatever credential an agent sent is removed before the provider key goes in.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "x-goog-api-key", "proxy-authorization"}
)


def fingerprint(key: str) -> str:
    """A non-reversible label for a secret, safe for audit records: ``sha256:`` + 12 hex."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class ProviderKey:
    """One provider key, immutable, handed out per request."""

    __slots__ = ("_secret", "fingerprint", "kind", "provider", "source")

    provider: str
    kind: ProviderKind
    fingerprint: str
    source: str
    _secret: str

    def __init__(self, provider: str, kind: ProviderKind, secret: str, source: str) -> None:
        object.__setattr__(self, "provider", provider)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "_secret", secret)
        object.__setattr__(self, "fingerprint", fingerprint(secret))
        object.__setattr__(self, "source", source)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("ProviderKey is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("ProviderKey is immutable")

    def __repr__(self) -> str:
        return (
            f"ProviderKey(provider={self.provider!r}, kind={self.kind.value!r}, "
            f"fingerprint={self.fingerprint!r}, source={self.source!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("ProviderKey cannot be pickled")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ProviderKey) and (self.provider, self.fingerprint) == (
            other.provider,
            other.fingerprint,
        )

    def __hash__(self) -> int:
        return hash((self.provider, self.fingerprint))

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it upstream."""
        return self._secret

    def header(self) -> tuple[str, str]:
        """The (lower-case name, value) pair this provider expects."""
        if self.kind is ProviderKind.ANTHROPIC:
            return "x-api-key", self._secret
        if self.kind is ProviderKind.AZURE:
            return "api-key", self._secret
        return "authorization", f"Bearer {self._secret}"

    def apply(self, headers: Mapping[str, str]) -> dict[str, str]:
        """A copy of ``headers`` (names lower-cased) without any agent credential, plus this key."""
        out = {
            name.lower(): value
            for name, value in headers.items()
            if name.lower() not in CREDENTIAL_HEADERS
        }
        name, value = self.header()
        out[name] = value
        return out


def _describe(exc: BaseException) -> str:
    # YAML errors quote the offending line, which here would be a secret.
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"YAML syntax error at line {exc.problem_mark.line + 1}"
    if isinstance(exc, yaml.YAMLError):
        return "YAML syntax error"
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc)


def _default_kind(provider: str) -> ProviderKind:
    try:
        return ProviderKind(provider)
    except ValueError:
        return ProviderKind.OPENAI


class ProviderKeyVault:
    """Holds upstream provider keys from a secrets file and/or environment variables."""

    def __init__(
        self,
        config: VaultConfig | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or VaultConfig()
        self.last_error: str | None = None
        self._environ = environ if environ is not None else os.environ
        self._file_keys: dict[str, ProviderKey] | None = None
        self._signature: tuple[int, int, int] | None = None
        self._bad_signature: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._env_keys: dict[str, ProviderKey] = {}
        self._lock = threading.Lock()
        if self.config.file is not None:
            self.reload()

    def __repr__(self) -> str:
        return f"ProviderKeyVault(file={self.config.file!s}, providers={sorted(self.providers())})"

    def providers(self) -> set[str]:
        """Every provider name the vault knows a source for."""
        names = set(self.config.providers)
        self._maybe_reload()
        names.update(self._file_keys or {})
        return names

    def key_for(self, provider: str) -> ProviderKey:
        """The current key for ``provider``; keep it for the whole request.

        Raises ``UpstreamError`` (503, ``provider_key_unavailable``) when no source
        has a key: a request never goes upstream with the agent's own credential.
        """
        self._maybe_reload()
        file_keys = self._file_keys
        if file_keys is not None and provider in file_keys:
            return file_keys[provider]
        source = self.config.providers.get(provider)
        if source is not None and source.env:
            secret = self._environ.get(source.env)
            if secret:
                return self._from_env(provider, source, secret)
        raise UpstreamError(
            f"no key for provider {provider!r} is available",
            status=503,
            code="provider_key_unavailable",
        )

    def inject(
        self, provider: str, headers: Mapping[str, str]
    ) -> tuple[dict[str, str], ProviderKey]:
        """Headers for the upstream request with the agent's credential replaced by the provider key.

        Returns the new headers and the key used (record ``key.fingerprint`` in the audit).
        """
        key = self.key_for(provider)
        return key.apply(headers), key

    def _from_env(self, provider: str, source: ProviderSource, secret: str) -> ProviderKey:
        # Reuse the object while the value is unchanged, so identical keys compare cheaply.
        current = self._env_keys.get(provider)
        if current is not None and current.reveal() == secret and current.kind is source.kind:
            return current
        key = ProviderKey(provider, source.kind, secret, f"env:{source.env}")
        if current is not None:
            log.info("provider %s key rotated from environment: %s", provider, key.fingerprint)
        self._env_keys[provider] = key
        return key

    def _maybe_reload(self) -> None:
        if self.config.file is not None and time.monotonic() >= self._next_check:
            self.reload()

    def reload(self) -> bool:
        """Re-read the secrets file if it changed; True when a new version was loaded."""
        path = self.config.file
        if path is None:
            return False
        with self._lock:
            self._next_check = time.monotonic() + self.config.check_interval_seconds
            try:
                st = os.stat(path)
            except OSError as exc:
                self._fail(f"cannot stat provider secrets file {path}: {exc.strerror or exc}")
                return False
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if signature in (self._signature, self._bad_signature):
                return False
            try:
                keys = self._parse(path)
            except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
                self._bad_signature = signature
                self._fail(f"invalid provider secrets file {path}: {_describe(exc)}")
                return False
            old = self._file_keys or {}
            for name, key in keys.items():
                if name in old and old[name].fingerprint != key.fingerprint:
                    log.info(
                        "provider %s key rotated: %s -> %s",
                        name,
                        old[name].fingerprint,
                        key.fingerprint,
                    )
            self._file_keys = keys
            self._signature = signature
            self._bad_signature = None
            self.last_error = None
            return True

    def _parse(self, path: Path) -> dict[str, ProviderKey]:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("providers"), dict):
            # Never echo the content: it is full of secrets.
            raise ValueError("expected a mapping with a 'providers' mapping")
        keys: dict[str, ProviderKey] = {}
        for name, value in data["providers"].items():
            if not isinstance(name, str):
                raise ValueError("provider names must be strings")
            configured = self.config.providers.get(name)
            kind = configured.kind if configured is not None else _default_kind(name)
            if isinstance(value, dict):
                secret = value.get("key")
                if "kind" in value and configured is None:
                    try:
                        kind = ProviderKind(value["kind"])
                    except ValueError:
                        raise ValueError(f"provider {name!r}: unknown kind") from None
            else:
                secret = value
            if not isinstance(secret, str) or not secret.strip():
                raise ValueError(f"provider {name!r}: the key must be a non-empty string")
            keys[name] = ProviderKey(name, kind, secret.strip(), f"file:{path}")
        return keys

    def _fail(self, message: str) -> None:
        if message == self.last_error:
            return
        self.last_error = message
        if self._file_keys is None:
            log.error("%s; keys from this file are unavailable until it is fixed", message)
        else:
            log.error("%s; still using the last good version", message)
