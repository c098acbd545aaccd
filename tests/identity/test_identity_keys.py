"""API and virtual keys: hashed storage, the `bastion keys` CLI, reload without restart."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from bastion.errors import AuthError, IdentityUnavailable
from bastion.identity import (
    IdentityConfig,
    IdentityResolver,
    KeyEntry,
    KeyStore,
    credential_headers,
    generate_secret,
    hash_secret,
    main,
)


def create_key(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["create", "--file", str(path), *args]) == 0
    out = capsys.readouterr().out.strip()
    return out


def resolver_for(path: Path) -> IdentityResolver:
    return IdentityResolver(IdentityConfig(key_file=path, key_check_interval_seconds=0))


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.yaml"


async def test_created_key_resolves_to_its_identity(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_key(
        key_file, capsys, "--subject", "ci-bot", "--group", "eng", "--attr", "team=platform",
        "--model", "gpt-4o*", "--provider", "openai", "--email", "ci@example.com",
    )  # fmt: skip
    auth = await resolver_for(key_file).authenticate({"authorization": f"Bearer {secret}"})
    assert auth.identity.subject == "ci-bot"
    assert auth.identity.groups == ("eng",)
    assert auth.identity.get("team") == "platform"
    assert auth.identity.email == "ci@example.com"
    assert auth.identity.auth_method == "virtual_key"
    assert auth.virtual_key is not None
    assert auth.identity.key_id == auth.virtual_key.key_id
    assert secret.startswith(f"bst_{auth.virtual_key.key_id}_")


async def test_key_works_in_x_api_key_header(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_key(key_file, capsys, "--subject", "claude-agent", "--kind", "api")
    identity = await resolver_for(key_file).resolve({"x-api-key": secret})
    assert identity.subject == "claude-agent"
    assert identity.auth_method == "api_key"


def test_key_file_holds_only_the_hash(key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = create_key(key_file, capsys, "--subject", "s")
    text = key_file.read_text()
    # the random part is urlsafe base64 and may itself contain "_", so cut at the key id
    key_id = secret.split("_")[1]
    random_part = secret.removeprefix(f"bst_{key_id}_")
    assert len(random_part) >= 40
    assert secret not in text and random_part not in text
    assert hash_secret(secret) in text
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"


def test_list_shows_keys_without_secrets_or_hashes(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_key(key_file, capsys, "--subject", "lister", "--model", "claude-*")
    assert main(["list", "--file", str(key_file), "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert [(r["subject"], r["status"], r["models"]) for r in rows] == [
        ("lister", "active", ["claude-*"])
    ]
    assert secret not in out and "sha256:" not in out


async def test_wrong_secret_for_a_known_key_id_is_refused(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_key(key_file, capsys, "--subject", "s")
    forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    with pytest.raises(AuthError) as info:
        await resolver_for(key_file).resolve({"x-api-key": forged})
    assert info.value.status == 401 and info.value.code == "invalid_key"


async def test_revoked_key_is_refused(key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = create_key(key_file, capsys, "--subject", "leaky")
    resolver = resolver_for(key_file)
    assert (await resolver.resolve({"x-api-key": secret})).subject == "leaky"
    key_id = secret.split("_")[1]
    assert main(["revoke", "--file", str(key_file), key_id]) == 0
    with pytest.raises(AuthError) as info:
        await resolver.resolve({"x-api-key": secret})
    assert info.value.status == 401 and info.value.code == "key_revoked"


async def test_expired_key_is_refused(key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    secret = create_key(key_file, capsys, "--subject", "old", "--expires", past)
    with pytest.raises(AuthError) as info:
        await resolver_for(key_file).resolve({"x-api-key": secret})
    assert info.value.code == "key_expired"


async def test_key_with_future_expiry_is_accepted(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_key(key_file, capsys, "--subject", "fresh", "--expires", "1d")
    assert (await resolver_for(key_file).resolve({"x-api-key": secret})).subject == "fresh"


async def test_virtual_key_used_for_a_model_it_does_not_allow_is_403(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_key(
        key_file, capsys, "--subject", "s", "--provider", "openai",
        "--model", "gpt-4o-mini", "--model", "anthropic/claude-3-5-*",
    )  # fmt: skip
    auth = await resolver_for(key_file).authenticate({"x-api-key": secret})
    auth.check_model("openai", "gpt-4o-mini")
    with pytest.raises(AuthError) as info:
        auth.check_model("openai", "gpt-4o")
    assert info.value.status == 403 and info.value.code == "model_not_allowed"
    # the provider glob does not cover anthropic, so its model grant cannot be used
    with pytest.raises(AuthError):
        auth.check_model("anthropic", "claude-3-5-sonnet")


def test_provider_qualified_model_glob_only_matches_that_provider() -> None:
    store = KeyStore(entries=[_entry("k1abcd", providers=["*"], models=["anthropic/claude-*"])])
    key = store.keys()[0]
    assert key.allows_model("anthropic", "claude-sonnet-4")
    assert not key.allows_model("openrouter", "claude-sonnet-4")
    assert not key.allows_model(None, "claude-sonnet-4")


def test_key_without_model_grants_may_use_no_model() -> None:
    key = KeyStore(entries=[_entry("k2abcd")]).keys()[0]
    assert not key.allows_model("openai", "gpt-4o")


async def test_new_key_in_file_works_without_restart(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = create_key(key_file, capsys, "--subject", "first")
    # the default check interval: the unknown key id makes the store look at the file at once
    resolver = IdentityResolver(IdentityConfig(key_file=key_file))
    assert (await resolver.resolve({"x-api-key": first})).subject == "first"
    second = create_key(key_file, capsys, "--subject", "second")
    assert (await resolver.resolve({"x-api-key": second})).subject == "second"


async def test_invalid_key_file_keeps_last_good_version_and_reports(
    key_file: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    secret = create_key(key_file, capsys, "--subject", "steady")
    resolver = resolver_for(key_file)
    assert (await resolver.resolve({"x-api-key": secret})).subject == "steady"
    key_file.write_text("keys: [ {id: broken")
    with caplog.at_level(logging.ERROR, logger="bastion.identity.keys"):
        assert (await resolver.resolve({"x-api-key": secret})).subject == "steady"
    assert resolver.keys is not None and resolver.keys.last_error
    assert "last good version" in caplog.text


async def test_truncated_key_file_does_not_revoke_every_key(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = create_key(key_file, capsys, "--subject", "steady")
    resolver = resolver_for(key_file)
    await resolver.resolve({"x-api-key": secret})
    key_file.write_text("")
    assert (await resolver.resolve({"x-api-key": secret})).subject == "steady"


async def test_key_file_never_valid_is_503(key_file: Path) -> None:
    key_file.write_text("version: 7\nkeys: nope\n")
    _, secret = generate_secret()
    with pytest.raises(IdentityUnavailable) as info:
        await resolver_for(key_file).resolve({"x-api-key": secret})
    assert info.value.status == 503


async def test_unreadable_key_file_at_start_is_503(key_file: Path) -> None:
    _, secret = generate_secret()
    with pytest.raises(IdentityUnavailable):
        await resolver_for(key_file).resolve({"x-api-key": secret})


async def test_key_file_fixed_after_being_invalid_is_loaded(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file.write_text("not: [valid")
    resolver = resolver_for(key_file)
    _, stray = generate_secret()
    with pytest.raises(IdentityUnavailable):
        await resolver.resolve({"x-api-key": stray})
    key_file.unlink()
    secret = create_key(key_file, capsys, "--subject", "repaired")
    assert (await resolver.resolve({"x-api-key": secret})).subject == "repaired"


async def test_programmatic_key_resolves(tmp_path: Path) -> None:
    key_id, secret = generate_secret()
    entry = _entry(key_id, secret=secret, subject="svc", groups=["bots"])
    resolver = IdentityResolver(IdentityConfig(keys=[entry]))
    identity = await resolver.resolve({"authorization": f"Bearer {secret}"})
    assert (identity.subject, identity.groups) == ("svc", ("bots",))


async def test_keys_are_refused_when_none_are_configured() -> None:
    _, secret = generate_secret()
    with pytest.raises(AuthError) as info:
        await IdentityResolver(IdentityConfig()).resolve({"x-api-key": secret})
    assert info.value.status == 401


@pytest.mark.parametrize(
    "secret", ["bst_", "bst_short_x", "bst_ABCDEF123456_" + "a" * 43, "bst_zz"]
)
async def test_malformed_key_is_refused(key_file: Path, secret: str) -> None:
    key_file.write_text("version: 1\nkeys: []\n")
    with pytest.raises(AuthError) as info:
        await resolver_for(key_file).resolve({"x-api-key": secret})
    assert info.value.status == 401


async def test_different_credentials_in_both_headers_are_refused(
    key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = create_key(key_file, capsys, "--subject", "me")
    other = create_key(key_file, capsys, "--subject", "other")
    with pytest.raises(AuthError) as info:
        await resolver_for(key_file).resolve(
            {"authorization": f"Bearer {mine}", "x-api-key": other}
        )
    assert info.value.status == 401


def test_repeated_credential_header_is_refused() -> None:
    raw = [
        (b"authorization", b"Bearer a"),
        (b"content-type", b"x"),
        (b"Authorization", b"Bearer b"),
    ]
    with pytest.raises(AuthError):
        credential_headers(raw)
    assert credential_headers([(b"x-api-key", b"k"), (b"host", b"h")]) == {"x-api-key": "k"}


def test_key_file_written_by_hand_is_accepted(tmp_path: Path) -> None:
    key_id, secret = generate_secret()
    path = tmp_path / "hand.yaml"
    document = {
        "version": 1,
        "keys": [
            {
                "id": key_id,
                "hash": hash_secret(secret),
                "subject": "hand",
                "models": ["*"],
                "providers": ["*"],
                "expires": "2999-01-01T00:00:00Z",
            }
        ],
    }
    path.write_text(yaml.safe_dump(document))
    os.chmod(path, 0o600)
    key = KeyStore(path).authenticate(secret)
    assert key.identity.subject == "hand" and key.allows_model("openai", "o3")


def _entry(key_id: str, *, secret: str | None = None, **fields: object) -> KeyEntry:
    values: dict[str, object] = {
        "id": key_id,
        "hash": hash_secret(secret or f"bst_{key_id}_unused"),
        "subject": "someone",
    }
    values.update(fields)
    return KeyEntry.model_validate(values)
