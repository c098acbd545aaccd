"""The ``bastion serve`` configuration: one YAML file, validated with pydantic at the edge.

:func:`load_config` reads the file, expands ``${VAR}`` / ``${VAR:-default}`` in
string values, validates it, resolves relative paths against the file's
directory and checks the cross references (routes name known providers, and so
on). Every problem becomes one line of a :class:`ConfigError` naming the file,
the key path and what was expected::

    bastion.yaml: providers.openai.base_url: expected an http(s) URL, got 42

Values under keys that look secret (``*secret*``, ``*token*``, ``*password*``,
``key``) are never quoted back in errors.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from bastion.identity.config import IdentityConfig, ProviderKind, ProviderSource, VaultConfig

__all__ = [
    "AggregateConfig",
    "ApprovalsConfig",
    "AuditConfig",
    "AuditSinkConfig",
    "ConfigError",
    "GatewayConfig",
    "ListenConfig",
    "MCPServerConfig",
    "OnBehalfOfConfig",
    "PolicyConfig",
    "PoolConfig",
    "ProviderConfig",
    "QuarantineModelConfig",
    "RefusalConfig",
    "RouteConfig",
    "SessionConfig",
    "TimeoutConfig",
    "load_config",
    "parse_config",
]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")
_SECRET_KEY = re.compile(r"(?i)(secret|token|password|passwd|^key$|api_key|credential)")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one readable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _url(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected an http(s) URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http(s) URL")
    return value.rstrip("/")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Model):
    """Where the gateway listens."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class PolicyConfig(_Model):
    """Which policy files to load, and how to notice they changed."""

    paths: list[Path] = Field(min_length=1)
    schema_path: Path | None = Field(default=None, alias="schema")
    watch: bool = True
    check_interval_seconds: float = Field(default=1.0, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    _paths = field_validator("paths", mode="before")(_as_list)


class TimeoutConfig(_Model):
    """Upstream timeouts in seconds (``read`` is the longest wait between two chunks)."""

    connect: float = Field(default=5.0, gt=0)
    read: float = Field(default=300.0, gt=0)
    write: float = Field(default=30.0, gt=0)
    pool: float = Field(default=10.0, gt=0)


class PoolConfig(_Model):
    """The shared upstream connection pool."""

    max_connections: int = Field(default=200, gt=0)
    max_keepalive_connections: int = Field(default=50, ge=0)
    keepalive_expiry_seconds: float = Field(default=30.0, ge=0)


class ProviderConfig(_Model):
    """One upstream LLM provider.

    ``kind`` decides the protocol and the key header: ``openai`` (every
    OpenAI-compatible API: OpenAI, Groq, Mistral, OpenRouter, vLLM, Ollama...;
    ``Authorization: Bearer``), ``azure`` (OpenAI-compatible, ``api-key``) or
    ``anthropic`` (``x-api-key``). ``base_url`` follows each SDK's convention:
    ``https://api.openai.com/v1`` (the gateway appends ``/chat/completions``,
    ``/responses``, ``/models``) and ``https://api.anthropic.com`` (it appends
    ``/v1/messages``). The key comes from ``key_env`` or from the gateway's
    ``secrets_file`` under this provider's name; neither may be absent.
    ``models`` are the model names (globs) this provider serves, used for
    routing and listed by ``/v1/models``.
    """

    kind: Literal["openai", "anthropic", "azure"] = "openai"
    base_url: str
    key_env: str | None = None
    headers: dict[str, str] = {}
    query: dict[str, str] = Field(default={}, description="query parameters (Azure api-version)")
    models: list[str] = []
    timeouts: TimeoutConfig | None = None

    _base = field_validator("base_url", mode="before")(_url)

    @property
    def protocol(self) -> Literal["openai", "anthropic"]:
        return "anthropic" if self.kind == "anthropic" else "openai"


class RouteConfig(_Model):
    """Model routing: requests whose model matches ``model`` (a glob) go to ``provider``."""

    model: str = Field(min_length=1)
    provider: str


class OnBehalfOfConfig(_Model):
    """RFC 8693 token exchange for one MCP upstream (endpoint in ``identity.token_exchange``)."""

    audience: str = Field(min_length=1)
    scope: str | None = None


class MCPServerConfig(_Model):
    """One upstream MCP server reached over streamable HTTP."""

    url: str
    headers: dict[str, str] = {}
    on_behalf_of: OnBehalfOfConfig | None = None
    timeouts: TimeoutConfig | None = None

    _url = field_validator("url", mode="before")(_url)


class AggregateConfig(_Model):
    """The aggregated ``/mcp`` endpoint merging every upstream as ``server__tool``."""

    enabled: bool = True
    page_size: int = Field(default=100, gt=0, description="tools per tools/list page")
    session_ttl_seconds: float = Field(default=3600.0, gt=0)
    server_name: str = "bastion"


class QuarantineModelConfig(_Model):
    """The quarantined model: any OpenAI-compatible endpoint, no tools."""

    base_url: str
    model: str
    key_env: str | None = None
    timeout_seconds: float = Field(default=20.0, gt=0)
    max_rounds: int = Field(default=3, ge=1)
    headers: dict[str, str] = {}

    _base = field_validator("base_url", mode="before")(_url)


class AuditSinkConfig(_Model):
    """One audit sink: ``.db``/``.sqlite``/``.sqlite3`` is SQLite, anything else JSON Lines."""

    path: Path
    max_bytes: int | None = Field(default=None, gt=0)
    max_files: int | None = Field(default=None, gt=0)
    fsync: bool = False


class AuditConfig(_Model):
    """The audit trail and the decision log."""

    sinks: list[AuditSinkConfig] = []
    arguments: Literal["redact", "digest", "none", "full"] = "redact"
    on_overflow: Literal["fail_closed", "drop"] = "fail_closed"
    trace_sample_rate: float = Field(default=0.0, ge=0, le=1)
    queue_size: int = Field(default=10_000, gt=0)
    log_decisions: bool = True
    # Also record tools shown as offered and tool output trusted as it stands.
    all_decisions: bool = False


class SessionConfig(_Model):
    """Where session state lives: ``memory`` or a ``redis://`` URL."""

    store: str = "memory"
    conversation_header: str = "x-bastion-conversation"

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
            return value
        raise ValueError("expected 'memory' or a redis:// URL")


class RefusalConfig(_Model):
    """How refused tool calls are answered: in band (default) or as protocol errors."""

    llm: Literal["message", "error"] = "message"
    mcp: Literal["result", "error"] = "result"


class ApprovalsConfig(_Model):
    """The approval API (``/approvals``): who may approve held calls."""

    enabled: bool = True
    approver_groups: list[str] = []
    approver_subjects: list[str] = []
    allow_self_approval: bool = False


class GatewayConfig(_Model):
    """The whole ``bastion.yaml`` (see ``examples/bastion.yaml``)."""

    version: Literal[1] = 1
    listen: ListenConfig = ListenConfig()
    policy: PolicyConfig
    identity: IdentityConfig = IdentityConfig()
    secrets_file: Path | None = Field(default=None, description="provider keys (YAML)")
    secrets_check_interval_seconds: float = Field(default=1.0, ge=0)
    providers: dict[str, ProviderConfig] = {}
    routes: list[RouteConfig] = []
    mcp: dict[str, MCPServerConfig] = {}
    aggregate: AggregateConfig = AggregateConfig()
    quarantine: QuarantineModelConfig | None = None
    audit: AuditConfig = AuditConfig()
    metrics: bool = True
    session: SessionConfig = SessionConfig()
    pool: PoolConfig = PoolConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    refusal: RefusalConfig = RefusalConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()

    @model_validator(mode="after")
    def _no_identity_vault(self) -> GatewayConfig:
        if self.identity.vault is not None:
            raise ValueError(
                "identity.vault is set by the gateway: use providers.<name>.key_env and secrets_file"
            )
        return self

    def vault_config(self) -> VaultConfig:
        """The provider-key vault built from ``providers`` and ``secrets_file``."""
        return VaultConfig(
            file=self.secrets_file,
            check_interval_seconds=self.secrets_check_interval_seconds,
            providers={
                name: ProviderSource(kind=ProviderKind(p.kind), env=p.key_env)
                for name, p in self.providers.items()
            },
        )

    def provider_for(
        self, protocol: Literal["openai", "anthropic"], model: str
    ) -> tuple[str, ProviderConfig] | None:
        """The provider a model routes to by configuration (routes, then ``models``, then the
        only provider of that protocol); None when nothing matches."""
        for route in self.routes:
            provider = self.providers[route.provider]
            if provider.protocol == protocol and fnmatch.fnmatchcase(model, route.model):
                return route.provider, provider
        candidates = [(n, p) for n, p in self.providers.items() if p.protocol == protocol]
        for name, provider in candidates:
            if any(fnmatch.fnmatchcase(model, pattern) for pattern in provider.models):
                return name, provider
        if len(candidates) == 1 and not candidates[0][1].models:
            return candidates[0]
        return None


# ------------------------------------------------------------------ loading


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe_value(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    return repr(text if len(text) <= 60 else text[:57] + "...")


_EXPECTED = {
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "path_type": "expected a file path",
}


def _problem(file: str, error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    # pydantic appends the validator's name for function-before validators' loc; drop
    # non-key parts it adds for unions and tagged types.
    path = _key_path(tuple(p for p in loc if not (isinstance(p, str) and "[" in p)))
    kind = error["type"]
    secret = any(isinstance(p, str) and _SECRET_KEY.search(p) for p in loc)
    value = error.get("input")
    got = "" if secret else f", got {_describe_value(value)}"
    if kind == "missing":
        return f"{file}: {path}: required key is missing"
    if kind == "extra_forbidden":
        return f"{file}: {path}: unknown key"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{file}: {path}: expected one of {expected}{got}"
    if kind in _EXPECTED:
        return f"{file}: {path}: {_EXPECTED[kind]}{got}"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = "expected a number that is " + message.removeprefix("Input should be ")
    elif message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
    if not message.startswith("expected"):
        got = ""
    return f"{file}: {path}: {message}{got}"


def _interpolate(value: Any, path: tuple[int | str, ...], env: Mapping[str, str], file: str) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*path, str(k)), env, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*path, i), env, file) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            [
                f"{file}: {_key_path(path)}: environment variable {name} is not set (write ${{{name}:-default}} for a default)"
            ]
        )

    return _ENV_REF.sub(substitute, value)


def _resolve(base: Path, path: Path | None) -> Path | None:
    if path is None:
        return None
    expanded = path.expanduser()
    return expanded if expanded.is_absolute() else base / expanded


def _with_paths(config: GatewayConfig, base: Path) -> GatewayConfig:
    policy = config.policy.model_copy(
        update={
            "paths": [_resolve(base, p) for p in config.policy.paths],
            "schema_path": _resolve(base, config.policy.schema_path),
        }
    )
    identity = config.identity.model_copy(
        update={"key_file": _resolve(base, config.identity.key_file)}
    )
    audit = config.audit.model_copy(
        update={
            "sinks": [
                s.model_copy(update={"path": _resolve(base, s.path)}) for s in config.audit.sinks
            ]
        }
    )
    return config.model_copy(
        update={
            "policy": policy,
            "identity": identity,
            "audit": audit,
            "secrets_file": _resolve(base, config.secrets_file),
        }
    )


def _cross_check(config: GatewayConfig, file: str) -> list[str]:
    problems = []
    known = ", ".join(sorted(config.providers)) or "none configured"
    for i, route in enumerate(config.routes):
        if route.provider not in config.providers:
            problems.append(
                f"{file}: routes[{i}].provider: unknown provider {route.provider!r} (known: {known})"
            )
    for name in list(config.providers) + list(config.mcp):
        kind = "providers" if name in config.providers else "mcp"
        if not _NAME.match(name) or "__" in name:
            problems.append(
                f"{file}: {kind}.{name}: names are letters, digits, '.', '-' and single '_' "
                "(the aggregated MCP endpoint joins server and tool with '__')"
            )
    for name, server in config.mcp.items():
        if server.on_behalf_of is not None and config.identity.token_exchange is None:
            problems.append(
                f"{file}: mcp.{name}.on_behalf_of: needs identity.token_exchange (the token endpoint)"
            )
    for name, provider in config.providers.items():
        if provider.key_env is None and config.secrets_file is None:
            problems.append(
                f"{file}: providers.{name}: expected key_env or a top-level secrets_file "
                "(the provider key never comes from the agent)"
            )
    return problems


def parse_config(
    data: Any,
    *,
    file: str = "bastion.yaml",
    base: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Validate an already parsed YAML document (raises :class:`ConfigError`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: (top level): expected a mapping, got {_describe_value(data)}"])
    data = _interpolate(data, (), os.environ if environ is None else environ, file)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_problem(file, e) for e in exc.errors()]) from None
    config = _with_paths(config, base if base is not None else Path.cwd())
    problems = _cross_check(config, file)
    if problems:
        raise ConfigError(problems)
    return config


def load_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Read, interpolate and validate a configuration file (raises :class:`ConfigError`)."""
    file = Path(path)
    name = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{name}: no such file"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{name}: not UTF-8 text"]) from None
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise ConfigError([f"{where}: invalid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{name}: invalid YAML: {exc}"]) from None
    return parse_config(data, file=name, base=file.resolve().parent, environ=environ)
