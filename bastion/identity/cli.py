"""``bastion keys``: create, list and revoke API and virtual keys in a key file.

``create`` prints the secret once and writes only its hash. Every change
rewrites the file atomically (temporary file + rename, mode 0600), so a running
Bastion picks it up without a restart and never reads a half-written file.
Comments in the file are not preserved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bastion.identity.config import KeyEntry, KeyFile
from bastion.identity.keys import DEFAULT_KEY_PREFIX, generate_secret, hash_secret

__all__ = ["main"]

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _expiry(text: str) -> datetime:
    match = _DURATION.fullmatch(text)
    if match:
        amount, unit = match.groups()
        return datetime.now(UTC) + timedelta(**{_UNITS[unit]: int(amount)})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30d, 12h) nor an ISO date"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _attribute(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def load_key_file(path: Path) -> KeyFile:
    """The key file at ``path``; a missing file is an empty one."""
    if not path.exists():
        return KeyFile()
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return KeyFile.model_validate(data if data is not None else {})


def write_key_file(path: Path, keys: KeyFile) -> None:
    """Write ``keys`` to ``path`` atomically with owner-only permissions."""
    data = keys.model_dump(mode="json", exclude_defaults=True)
    data["version"] = keys.version
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create(args: argparse.Namespace) -> int:
    path = Path(args.file)
    current = load_key_file(path)
    key_id, secret = generate_secret(args.prefix)
    entry = KeyEntry(
        id=key_id,
        hash=hash_secret(secret),
        kind=args.kind,
        subject=args.subject,
        groups=args.group,
        roles=args.role,
        email=args.email,
        tenant=args.tenant,
        scopes=args.scope,
        attributes=dict(args.attr),
        providers=args.provider,
        models=args.model,
        expires=args.expires,
        created=datetime.now(UTC).replace(microsecond=0),
        description=args.description,
    )
    write_key_file(path, KeyFile(keys=[*current.keys, entry]))
    print(secret)
    print(
        f"created {args.kind} key {key_id} for {args.subject}; "
        "the secret above is shown once and not stored",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    current = load_key_file(Path(args.file))
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for entry in current.keys:
        status = "revoked" if entry.revoked else "active"
        if not entry.revoked and entry.expires is not None and entry.expires <= now:
            status = "expired"
        rows.append(
            {
                "id": entry.id,
                "kind": entry.kind,
                "subject": entry.subject,
                "status": status,
                "groups": entry.groups,
                "providers": entry.providers,
                "models": entry.models,
                "expires": entry.expires.isoformat() if entry.expires else None,
                "description": entry.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(
            f"{row['id']}  {row['kind']:<7}  {row['status']:<7}  {row['subject']}"
            f"  models={','.join(row['models']) or '-'}  expires={row['expires'] or 'never'}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = Path(args.file)
    current = load_key_file(path)
    if not any(entry.id == args.key_id for entry in current.keys):
        print(f"no key {args.key_id} in {path}", file=sys.stderr)
        return 1
    keys = [
        entry.model_copy(update={"revoked": True}) if entry.id == args.key_id else entry
        for entry in current.keys
    ]
    write_key_file(path, KeyFile(keys=keys))
    print(f"revoked {args.key_id}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion keys", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="create a key and print its secret once")
    create.add_argument("--file", required=True, help="the key file (created if missing)")
    create.add_argument("--subject", required=True)
    create.add_argument("--kind", choices=["virtual", "api"], default="virtual")
    create.add_argument("--group", action="append", default=[])
    create.add_argument("--role", action="append", default=[])
    create.add_argument("--scope", action="append", default=[])
    create.add_argument("--email")
    create.add_argument("--tenant")
    create.add_argument(
        "--attr", action="append", default=[], type=_attribute, metavar="NAME=VALUE"
    )
    create.add_argument(
        "--provider", action="append", default=[], help="provider glob (repeatable)"
    )
    create.add_argument("--model", action="append", default=[], help="model glob (repeatable)")
    create.add_argument("--expires", type=_expiry, help="duration (30d, 12h) or ISO date")
    create.add_argument("--description", default="")
    create.add_argument("--prefix", default=DEFAULT_KEY_PREFIX, help=argparse.SUPPRESS)
    create.set_defaults(run=_create)

    listing = commands.add_parser("list", help="list keys (never secrets)")
    listing.add_argument("--file", required=True)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)

    revoke = commands.add_parser("revoke", help="mark a key revoked")
    revoke.add_argument("--file", required=True)
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_revoke)
    return parser


def main(argv: list[str]) -> int:
    """Entry point of ``bastion keys``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        print(f"bastion keys: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
