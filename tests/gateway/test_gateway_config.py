"""Configuration errors name the file, the key path and what was expected; never a traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bastion.gateway.config import ConfigError, load_config, parse_config

GOOD = {"policy": {"paths": "rules"}}


def problems(data: object, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ=environ or {})
    return info.value.problems


def test_a_number_where_a_url_belongs() -> None:
    data = {**GOOD, "providers": {"openai": {"base_url": 42, "key_env": "K"}}}
    assert problems(data) == [
        "bastion.yaml: providers.openai.base_url: expected an http(s) URL, got 42"
    ]


def test_an_unknown_provider_kind_lists_the_choices() -> None:
    data = {
        **GOOD,
        "providers": {"x": {"kind": "gemini", "base_url": "http://h/v1", "key_env": "K"}},
    }
    assert problems(data) == [
        "bastion.yaml: providers.x.kind: expected one of 'openai', 'anthropic' or 'azure', got 'gemini'"
    ]


def test_a_route_to_an_unconfigured_provider() -> None:
    data = {**GOOD, "routes": [{"model": "gpt-*", "provider": "openai"}]}
    assert problems(data) == [
        "bastion.yaml: routes[0].provider: unknown provider 'openai' (known: none configured)"
    ]


def test_unknown_keys_and_missing_sections_are_each_reported() -> None:
    assert problems({"listen": {"port": "eighty"}, "polcy": {}}) == [
        "bastion.yaml: listen.port: expected an integer, got 'eighty'",
        "bastion.yaml: policy: required key is missing",
        "bastion.yaml: polcy: unknown key",
    ]


def test_a_provider_without_a_key_source_is_refused() -> None:
    data = {**GOOD, "providers": {"openai": {"base_url": "https://api.openai.com/v1"}}}
    assert problems(data) == [
        "bastion.yaml: providers.openai: expected key_env or a top-level secrets_file "
        "(the provider key never comes from the agent)"
    ]


def test_secret_values_are_not_quoted_back() -> None:
    data = {
        **GOOD,
        "identity": {
            "token_exchange": {
                "token_endpoint": "http://t",
                "client_id": "c",
                "client_secret": 1234567,
            }
        },
    }
    (problem,) = problems(data)
    assert problem.startswith(
        "bastion.yaml: identity.token_exchange.client_secret: expected a string"
    )
    assert "1234567" not in problem


def test_environment_variables_are_interpolated() -> None:
    data = {**GOOD, "providers": {"p": {"base_url": "${BASE:-http://fallback}/v1", "key_env": "K"}}}
    assert parse_config(data, environ={}).providers["p"].base_url == "http://fallback/v1"
    assert (
        parse_config(data, environ={"BASE": "http://set"}).providers["p"].base_url
        == "http://set/v1"
    )
    assert problems({**GOOD, "session": {"store": "${REDIS_URL}"}}) == [
        "bastion.yaml: session.store: environment variable REDIS_URL is not set "
        "(write ${REDIS_URL:-default} for a default)"
    ]


def test_yaml_syntax_errors_point_at_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bastion.yaml"
    path.write_text("policy:\n  paths: [rules\nlisten: {port: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}:3:") and "invalid YAML" in problem


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "bastion.yaml"
    path.parent.mkdir()
    path.write_text("policy: {paths: [rules]}\naudit: {sinks: [{path: logs/audit.jsonl}]}\n")
    config = load_config(path)
    assert config.policy.paths == [path.parent / "rules"]
    assert config.audit.sinks[0].path == path.parent / "logs" / "audit.jsonl"


def serve(tmp_path: Path, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "bastion.yaml"
    path.write_text(textwrap.dedent(config))
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from bastion.cli import main; sys.exit(main())",
            "serve",
            "--config",
            str(path),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def test_bastion_serve_exits_2_with_the_message_and_no_traceback(tmp_path: Path) -> None:
    done = serve(
        tmp_path,
        """\
        policy: {paths: [rules]}
        providers:
          openai: {base_url: 42, key_env: OPENAI_API_KEY}
        """,
    )
    assert done.returncode == 2
    assert (
        f"{tmp_path / 'bastion.yaml'}: providers.openai.base_url: expected an http(s) URL, got 42"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_bastion_serve_reports_a_policy_that_does_not_compile(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "bad.policy").write_text('allow call "x" when\n')
    done = serve(tmp_path, "policy: {paths: [rules]}\n")
    assert done.returncode == 2
    assert "policy does not load" in done.stderr and "bad.policy:" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_documented_example_configuration_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "bastion.yaml"
    config = load_config(example, environ={"GITHUB_MCP_TOKEN": "t"})
    assert config.provider_for("openai", "gpt-4o-mini") is not None
    assert config.provider_for("openai", "gpt-4o-mini")[0] == "groq"  # type: ignore[index]
    assert config.provider_for("anthropic", "claude-sonnet-4")[0] == "anthropic"  # type: ignore[index]
    assert config.provider_for("anthropic", "gpt-4o") is None
