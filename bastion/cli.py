"""The ``bastion`` command: check | fmt | test | explain | serve | demo | keys | audit.

Each subcommand is a ``main(argv) -> int`` named by module path in ``COMMANDS``
and imported only when it runs, so ``bastion check`` never imports a server. No
subcommand ends in a traceback: problems with policies are printed as
``path:line:col: error: message``, anything unexpected as one ``bastion:`` line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from bastion.policy.ast import PolicyFile
    from bastion.policy.diagnostics import Diagnostic
    from bastion.policy.schema import Schema

__all__ = ["COMMANDS", "Command", "main"]


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: ``target`` is ``"module:function"``; ``extra`` the pip extra it needs."""

    target: str
    help: str
    extra: str | None = None


COMMANDS: dict[str, Command] = {
    "check": Command("bastion.cli:check_main", "check policy files for mistakes"),
    "fmt": Command("bastion.cli:fmt_main", "format policy files canonically"),
    "test": Command("bastion.cli:test_main", "run policy test files (*.test.yaml)"),
    "explain": Command("bastion.cli:explain_main", "decide one event and show why"),
    "serve": Command("bastion.gateway.cli:main", "run the gateway", extra="server"),
    "demo": Command("bastion.demo.cli:main", "run the offline prompt-injection demo"),
    "keys": Command("bastion.identity.cli:main", "create, list and revoke API and virtual keys"),
    "audit": Command("bastion.audit.cli:main", "read and verify audit trails"),
}

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


# ---- dispatch ----------------------------------------------------------------


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: bastion COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {n:<{width}}  {c.help}" for n, c in COMMANDS.items()]
    lines += ["", "Run 'bastion COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _resolve(name: str, command: Command) -> Callable[[list[str]], int] | str:
    """The command's function, or a message saying why it cannot run here."""
    module_name, _, func_name = command.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if missing == module_name or module_name.startswith(missing + "."):
            return (
                f"'bastion {name}' is not available in this installation ({module_name} is missing)"
            )
        hint = f": pip install 'bastion-guard[{command.extra}]'" if command.extra else ""
        return f"'bastion {name}' needs the Python package {missing!r}{hint}"
    except ImportError as exc:
        return f"'bastion {name}' cannot start: {exc}"
    func = getattr(module, func_name, None)
    if not callable(func):
        return f"'bastion {name}' is not available ({command.target} is missing)"
    return func  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bastion`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return EXIT_OK if args else EXIT_USAGE
    if args[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"bastion {version('bastion-guard')}")
        except PackageNotFoundError:
            print("bastion (not installed)")
        return EXIT_OK
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        print(f"bastion: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return EXIT_USAGE
    try:
        func = _resolve(name, command)
        if isinstance(func, str):
            print(f"bastion: {func}", file=sys.stderr)
            return EXIT_USAGE
        status = func(rest)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_FAIL)
    except KeyboardInterrupt:
        print("bastion: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAIL
    except Exception as exc:  # never a traceback for the user
        print(f"bastion {name}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE if not isinstance(exc, OSError) else EXIT_FAIL
    return status if isinstance(status, int) else EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse that says what is wrong in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---- shared helpers ------------------------------------------------------------


def _policy_files(paths: Sequence[str]) -> tuple[list[str], list[Diagnostic]]:
    """``.policy`` files named by ``paths`` (a directory gives its own, sorted)."""
    from bastion.policy.diagnostics import Diagnostic

    files: list[str] = []
    diags: list[Diagnostic] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, n)
                for n in os.listdir(p)
                if n.endswith(".policy") and os.path.isfile(os.path.join(p, n))
            )
            if not found:
                diags.append(Diagnostic(p, 1, 1, "no .policy files in this directory", code="io"))
            files.extend(found)
        elif os.path.exists(p):
            files.append(p)
        else:
            diags.append(Diagnostic(p, 1, 1, "no such file or directory", code="io"))
    return files, diags


def _read_sources(diags: Sequence[Diagnostic], known: Mapping[str, str]) -> dict[str, str]:
    """Source text for caret excerpts: what the policy kept, else the file if readable."""
    sources = dict(known)
    for d in diags:
        if d.file in sources or not os.path.isfile(d.file):
            continue
        try:
            with open(d.file, encoding="utf-8") as f:
                sources[d.file] = f.read()
        except (OSError, UnicodeDecodeError):
            continue
    return sources


def _print_diagnostics(
    diags: Sequence[Diagnostic], sources: Mapping[str, str], stream: Any = None
) -> None:
    from bastion.policy.diagnostics import format_diagnostics

    if diags:
        print(format_diagnostics(diags, sources=sources), file=stream or sys.stderr)


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- bastion check ---------------------------------------------------------------


def _parse_all(files: Sequence[str]) -> list[PolicyFile] | None:
    """Every file and what it includes, parsed; None when any does not parse."""
    from bastion.policy.ast import Include
    from bastion.policy.diagnostics import PolicyError
    from bastion.policy.parser import parse_file

    out: list[PolicyFile] = []
    seen: set[str] = set()
    todo = list(files)
    while todo:
        path = todo.pop(0)
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        try:
            pf = parse_file(path)
        except PolicyError:
            return None
        out.append(pf)
        base = os.path.dirname(path)
        todo.extend(os.path.join(base, s.path) for s in pf.statements if isinstance(s, Include))
    return out


def _schema_or_none(path: str | None) -> Schema | None:
    from bastion.policy.diagnostics import PolicyError
    from bastion.policy.schema import Schema

    if path is None:
        return None
    try:
        return Schema.load(path)
    except PolicyError:
        return None  # already reported by the loader


def _check(files: Sequence[PolicyFile], schema: Schema | None) -> list[Diagnostic]:
    # The policy package does not know the redactor's detector and group names.
    from bastion.policy.checker import check
    from bastion.redaction import DETECTORS, GROUPS

    return check(files, schema, redaction_names=frozenset((*DETECTORS, *GROUPS)))


def check_main(argv: list[str]) -> int:
    """``bastion check PATH... [--schema FILE] [--strict] [--format text|json]``."""
    parser = _Parser(
        prog="bastion check",
        description="Parse, compile and statically check a policy (all PATHs form one policy).",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".policy files or directories")
    parser.add_argument("--schema", metavar="FILE", help="YAML schema of tools and attributes")
    parser.add_argument("--strict", action="store_true", help="treat warnings as errors")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from bastion.policy.diagnostics import PolicyError
    from bastion.policy.engine import Policy

    files, diags = _policy_files(args.paths)
    sources: Mapping[str, str] = {}
    rules = 0
    loaded_files: Sequence[str] = files
    if files:
        try:
            policy = Policy.load(files, schema=args.schema)
        except PolicyError as exc:
            diags.extend(exc.diagnostics)
            # The compiler stops at errors; the checker can still say more.
            parsed = _parse_all(files)
            if parsed is not None:
                lines = {(d.file, d.line) for d in diags if d.severity == "error"}
                diags.extend(
                    d
                    for d in _check(parsed, _schema_or_none(args.schema))
                    if (d.file, d.line) not in lines
                )
        else:
            sources = policy.sources
            rules = policy.rule_count
            loaded_files = policy.files
            found = _check(policy.ast, policy.schema)
            at = {(d.file, d.line, d.col, d.severity) for d in found}
            # The compiler finds some of the same problems; keep one report each.
            extra = [d for d in policy.warnings if (d.file, d.line, d.col, d.severity) not in at]
            diags.extend([*found, *extra])
    if args.strict:
        diags = [replace(d, severity="error") for d in diags]
    errors = sum(1 for d in diags if d.severity == "error")
    warnings = len(diags) - errors
    if args.format == "json":
        out = {
            "ok": errors == 0,
            "files": list(loaded_files),
            "rules": rules,
            "errors": errors,
            "warnings": warnings,
            "diagnostics": [
                d.to_json()
                for d in sorted(diags, key=lambda d: (d.file, d.line, d.col, d.severity))
            ],
        }
        print(json.dumps(out, indent=2))
    else:
        _print_diagnostics(diags, _read_sources(diags, sources))
        if errors:
            print(f"{_count(errors, 'error')}, {_count(warnings, 'warning')}", file=sys.stderr)
        else:
            summary = f"ok: {_count(len(loaded_files), 'file')}, {_count(rules, 'rule')}"
            print(summary + (f", {_count(warnings, 'warning')}" if warnings else ""))
    return EXIT_FAIL if errors else EXIT_OK


# ---- bastion fmt -----------------------------------------------------------------


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".bastion-fmt-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fmt_main(argv: list[str]) -> int:
    """``bastion fmt PATH... [--check]``; ``-`` formats stdin to stdout."""
    parser = _Parser(prog="bastion fmt", description="Format policy files canonically, in place.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help=".policy files, directories or -")
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a file would change"
    )
    args = parser.parse_args(argv)

    from bastion.policy.diagnostics import Diagnostic, PolicyError
    from bastion.policy.formatter import format_source

    if args.paths == ["-"]:
        text = sys.stdin.read()
        try:
            sys.stdout.write(format_source(text, "<stdin>"))
        except PolicyError as exc:
            _print_diagnostics(exc.diagnostics, {"<stdin>": text})
            return EXIT_FAIL
        return EXIT_OK

    files, diags = _policy_files(args.paths)
    sources: dict[str, str] = {}
    changed: list[str] = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            diags.append(Diagnostic(path, 1, 1, f"cannot read policy file: {exc}", code="io"))
            continue
        sources[path] = text
        try:
            formatted = format_source(text, path)
        except PolicyError as exc:
            diags.extend(exc.diagnostics)
            continue
        if formatted == text:
            continue
        changed.append(path)
        if args.check:
            print(f"would reformat {path}")
        else:
            _write_atomically(path, formatted)
            print(f"reformatted {path}")
    _print_diagnostics(diags, sources)
    unchanged = len(files) - len(changed) - len({d.file for d in diags} & set(files))
    verb = "would be reformatted" if args.check else "reformatted"
    print(f"{_count(len(changed), 'file')} {verb}, {unchanged} unchanged", file=sys.stderr)
    if diags or (args.check and changed):
        return EXIT_FAIL
    return EXIT_OK


# ---- bastion test ----------------------------------------------------------------


def test_main(argv: list[str]) -> int:
    """``bastion test PATH... [--format text|json]``."""
    parser = _Parser(
        prog="bastion test",
        description="Run policy test files; a directory is searched for *.test.yaml.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)

    from bastion.policy.testing import format_report, report_json, run_tests

    report = run_tests(args.paths)
    if args.format == "json":
        print(json.dumps(report_json(report), indent=2))
    else:
        print(format_report(report))
    return EXIT_OK if report.ok else EXIT_FAIL


# ---- bastion explain -------------------------------------------------------------


def _json_arg(parser: argparse.ArgumentParser, flag: str, text: str | None, kind: type) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        parser.error(f"{flag}: invalid JSON: {exc}")
    if not isinstance(value, kind):
        parser.error(f"{flag}: expected a JSON {'object' if kind is dict else kind.__name__}")
    return value


def explain_main(argv: list[str]) -> int:
    """``bastion explain --policy PATH --identity JSON (--call|--list|--result|--model|--context-start)``."""
    parser = _Parser(
        prog="bastion explain",
        description="Decide one event against a policy and show every rule considered.",
    )
    parser.add_argument("--policy", action="append", required=True, metavar="PATH")
    parser.add_argument("--schema", metavar="FILE")
    parser.add_argument(
        "--identity", metavar="JSON", help='e.g. {"sub": "alice", "groups": ["eng"]}'
    )
    event = parser.add_mutually_exclusive_group(required=True)
    event.add_argument("--call", metavar="TOOL")
    event.add_argument("--list", metavar="TOOL,TOOL...")
    event.add_argument("--result", metavar="TOOL")
    event.add_argument("--model", metavar="NAME")
    event.add_argument(
        "--context-start", action="store_true", help="the trust a context starts with"
    )
    parser.add_argument("--args", metavar="JSON", help="the call's arguments (an object)")
    parser.add_argument("--output", metavar="JSON", help="the tool's output, for --result")
    parser.add_argument(
        "--context", metavar="JSON", help='e.g. {"tainted": true, "user_texts": [...]}'
    )
    parser.add_argument(
        "--request", metavar="JSON", help='e.g. {"method": "POST", "headers": {...}}'
    )
    parser.add_argument(
        "--tools", metavar="JSON", help='tool descriptions: {"name": {"annotations": {...}}}'
    )
    parser.add_argument("--format", choices=["text", "json"], default="text")
    args = parser.parse_args(argv)

    from pydantic import ValidationError

    from bastion.events import ModelRequest, RequestInfo
    from bastion.policy.diagnostics import PolicyError
    from bastion.policy.engine import Policy
    from bastion.policy.testing import (
        ANONYMOUS,
        ToolEntry,
        context_from,
        decision_to_json,
        format_decision,
        identity_from,
        tool_from,
    )

    identity_spec = _json_arg(parser, "--identity", args.identity, dict)
    call_args = _json_arg(parser, "--args", args.args, dict)
    context_spec = _json_arg(parser, "--context", args.context, dict)
    request_spec = _json_arg(parser, "--request", args.request, dict)
    tools_spec = _json_arg(parser, "--tools", args.tools, dict)
    output: Any = None
    if args.output is not None:
        try:
            output = json.loads(args.output)
        except json.JSONDecodeError:
            output = args.output  # plain text output is fine too
    try:
        tools = {n: ToolEntry.model_validate(v) for n, v in tools_spec.items()}
        identity = identity_from(identity_spec or ANONYMOUS)
        context = context_from(context_spec)
        request = RequestInfo(**request_spec) if request_spec else None
    except (ValidationError, TypeError, ValueError) as exc:
        parser.error(f"invalid event description: {exc}")

    files, diags = _policy_files(args.policy)
    if diags:
        _print_diagnostics(diags, {})
        return EXIT_FAIL
    try:
        policy = Policy.load(files, schema=args.schema)
    except PolicyError as exc:
        _print_diagnostics(exc.diagnostics, _read_sources(exc.diagnostics, {}))
        return EXIT_FAIL

    if args.list is not None:
        names = [n.strip() for n in args.list.split(",") if n.strip()]
        decisions = {
            n: policy.decide_visibility(
                identity, tool_from(n, tools), context, request=request, explain=True
            )
            for n in names
        }
        visible = [n for n, d in decisions.items() if d.allowed]
        if args.format == "json":
            out = {
                "visible": visible,
                "decisions": {n: decision_to_json(d) for n, d in decisions.items()},
            }
            print(json.dumps(out, indent=2, default=str))
        else:
            print(f"visible: {', '.join(visible) if visible else '(none)'}")
            for n, d in decisions.items():
                print(f"\n{n}:")
                print("\n".join("  " + line for line in format_decision(d).splitlines()))
        return EXIT_OK

    if args.call is not None:
        decision = policy.decide_call(
            identity, tool_from(args.call, tools), call_args, context, request=request, explain=True
        )
    elif args.result is not None:
        decision = policy.classify_result(
            identity,
            tool_from(args.result, tools),
            call_args,
            output,
            context,
            request=request,
            explain=True,
        )
    elif args.model is not None:
        decision = policy.decide_model(
            identity, ModelRequest(name=args.model), context, request=request, explain=True
        )
    else:
        decision = policy.decide_context(identity, request=request, explain=True)
    if args.format == "json":
        print(json.dumps(decision_to_json(decision), indent=2, default=str))
    else:
        print(format_decision(decision))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
