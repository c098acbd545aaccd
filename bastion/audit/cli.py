"""``bastion audit``: tail, query, verify and explain an audit log (JSON Lines or SQLite)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from bastion.audit.reader import RecordFilter, open_log, verify_log
from bastion.audit.record import format_time
from bastion.errors import AuditError

__all__ = ["main", "parse_time"]

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, *, now: float | None = None) -> str:
    """``--since``/``--until`` values: ISO 8601 (naive means UTC) or an age such as ``15m``, ``2h``, ``7d``."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        ago = float(relative.group(1)) * _UNITS[relative.group(2)]
        return format_time((time.time() if now is None else now) - ago)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use ISO 8601 or an age like 15m, 2h, 7d)"
        ) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return format_time(moment.timestamp())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion audit", description="Read and check Bastion audit logs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def log_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("log", help="audit log: a .jsonl file (rotated siblings included) or a .db")

    tail = sub.add_parser("tail", help="print the last records")
    log_arg(tail)
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many (default 10)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    tail.add_argument("--format", choices=("table", "json"), default="table")

    query = sub.add_parser("query", help="records matching every given filter")
    log_arg(query)
    query.add_argument("--subject", "--identity", dest="subject", help="identity subject")
    query.add_argument("--tool", "--target", dest="target", help="tool or model (glob)")
    query.add_argument("--effect", help="allow, forbid, ask, hide, quarantine, ...")
    query.add_argument("--rule", dest="rule_id", help="a matching rule id")
    query.add_argument("--kind", choices=("call", "visibility", "result", "model"))
    query.add_argument("--session", dest="session_id")
    query.add_argument("--since", type=parse_time, help="ISO 8601 time or age (15m, 2h, 7d)")
    query.add_argument("--until", type=parse_time, help="ISO 8601 time or age (exclusive)")
    query.add_argument("--limit", type=int)
    query.add_argument("--format", choices=("table", "json"), default="table")

    verify = sub.add_parser("verify", help="check the hash chain; exit 1 on the first bad record")
    log_arg(verify)

    explain = sub.add_parser("explain", help="show one record and its decision trace")
    log_arg(explain)
    explain.add_argument("record_id")
    return parser


_COLUMNS = ("time", "id", "subject", "kind", "target", "effect", "rules")


def _row(record: Mapping[str, Any]) -> tuple[str, ...]:
    identity = record.get("identity") or {}
    rules = ",".join(record.get("rule_ids") or []) or (
        "(default)" if record.get("defaulted") else ""
    )
    return (
        str(record.get("time", "")),
        str(record.get("id", "")),
        str(identity.get("subject", "")),
        str(record.get("kind", "")),
        str(record.get("target", "")),
        str(record.get("effect", "")),
        rules,
    )


def _print_records(
    records: Iterable[Mapping[str, Any]], fmt: str, out: TextIO, *, header: bool = True
) -> int:
    count = 0
    if fmt == "json":
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
        return count
    rows = [_row(r) for r in records]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(_COLUMNS)]
    if header:
        head = "  ".join(c.upper().ljust(w) for c, w in zip(_COLUMNS, widths, strict=True))
        out.write(head.rstrip() + "\n")
    for row in rows:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    return len(rows)


def _explain(record: Mapping[str, Any], out: TextIO) -> None:
    identity = record.get("identity") or {}
    lines = [
        f"record   {record.get('id')}",
        f"time     {record.get('time')}",
        f"identity {identity.get('subject')} (auth {identity.get('auth_method')}"
        + (f", tenant {identity['tenant']}" if identity.get("tenant") else "")
        + (f", key {identity['key_id']}" if identity.get("key_id") else "")
        + ")",
        f"request  {record.get('protocol')} {record.get('request_id') or '-'}"
        + (f" session {record['session_id']}" if record.get("session_id") else ""),
        f"decision {record.get('kind')} {record.get('target')} -> {str(record.get('effect')).upper()}"
        + (" (default)" if record.get("defaulted") else ""),
    ]
    if record.get("rule_ids"):
        lines.append(f"rules    {', '.join(record['rule_ids'])}")
    for reason in record.get("reasons") or []:
        lines.append(f"reason   {reason}")
    if record.get("shadow_hits"):
        lines.append(f"shadow   {', '.join(record['shadow_hits'])}")
    if record.get("taint_sources"):
        lines.append(f"taint    {', '.join(record['taint_sources'])}")
    if record.get("arguments") is not None:
        lines.append(f"args     {json.dumps(record['arguments'], ensure_ascii=False)}")
    quarantine = record.get("quarantine")
    if quarantine:
        lines.append(f"quarantine questions {json.dumps(quarantine.get('questions'))}")
        lines.append(f"quarantine answers   {json.dumps(quarantine.get('answers'))}")
        if quarantine.get("error"):
            lines.append(f"quarantine error     {quarantine['error']}")
    trace = record.get("trace")
    if trace is None:
        lines.append(
            "trace    not recorded (traces are kept for every denial and for a sample of the rest, "
            "when the engine produced one)"
        )
    else:
        lines.append(f"trace    {len(trace)} rule(s) considered:")
        for step in trace:
            mark = "matched" if step.get("matched") else "no match"
            shadow = " [shadow]" if step.get("shadow") else ""
            lines.append(
                f"  - {step.get('rule_id')} {step.get('effect')}{shadow}: {mark}"
                f"  ({step.get('location')})"
            )
            if step.get("condition"):
                lines.append(f"      when   {step['condition']}")
            if step.get("detail"):
                lines.append(f"      because {step['detail']}")
    out.write("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    """Run ``bastion audit <command>``; returns the exit status."""
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        log = open_log(args.log)
        if args.command == "tail":
            _print_records(log.tail(args.lines), args.format, out)
            if args.follow:
                out.flush()
                try:
                    for record in log.follow():
                        _print_records([record], args.format, out, header=False)
                        out.flush()
                except KeyboardInterrupt:
                    return 0
            return 0
        if args.command == "query":
            where = RecordFilter(
                subject=args.subject,
                target=args.target,
                effect=args.effect,
                rule_id=args.rule_id,
                kind=args.kind,
                session_id=args.session_id,
                since=args.since,
                until=args.until,
            )
            _print_records(log.query(where, args.limit), args.format, out)
            return 0
        if args.command == "verify":
            result = verify_log(log)
            for note in result.notes:
                out.write(f"note: {note}\n")
            if result.ok:
                out.write(f"OK: {result.records} records, chain intact, head {result.head}\n")
                return 0
            where_text = f" ({result.location})" if result.location else ""
            out.write(f"FAIL: record {result.bad_record}{where_text}: {result.reason}\n")
            return 1
        found = log.get(args.record_id)
        if found is None:
            sys.stderr.write(f"no record {args.record_id} in {args.log}\n")
            return 1
        _explain(found, out)
        return 0
    except AuditError as exc:
        sys.stderr.write(f"bastion audit: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
