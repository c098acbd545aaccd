"""The bastion command: check, fmt, test, explain, and the subcommand table."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bastion import cli
from bastion.cli import COMMANDS, Command, main

ROOT = Path(__file__).resolve().parents[1]
BASTION = Path(sys.executable).parent / "bastion"

GOOD = """\
default call deny
@id("eng-reads")
allow call "github__get_*" when identity.groups has "eng"
@id("no-mail-after-taint")
forbid call "mail__*" when context.tainted reason "mail is blocked after taint"
allow call "mail__send"
untrusted result "web__*"
allow model "gpt-4o-mini" route "openai"
"""


def policy(tmp_path: Path, text: str = GOOD, name: str = "p.policy") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- dispatch ------------------------------------------------------------------


def test_no_command_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([], capsys)
    assert code == 2
    assert "usage: bastion COMMAND" in out
    assert all(name in out for name in ("check", "fmt", "test", "explain", "serve"))


def test_help_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--help"], capsys)[0] == 0


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["chek"], capsys)
    assert code == 2
    assert "unknown command 'chek'" in err


def test_subcommand_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", "--help"], capsys)
    assert code == 0
    assert "--strict" in out


def test_missing_subcommand_module_gives_a_clear_message(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(COMMANDS, "later", Command("bastion.not_yet_written:main", "x"))
    code, _, err = run(["later"], capsys)
    assert code == 2
    assert "'bastion later' is not available" in err
    assert "bastion.not_yet_written" in err


def test_missing_dependency_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_dep_cmd.py").write_text("import surely_not_installed_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "dep", Command("needs_dep_cmd:main", "x", extra="server"))
    code, _, err = run(["dep"], capsys)
    assert code == 2
    assert "surely_not_installed_pkg" in err
    assert "pip install 'bastion-guard[server]'" in err


def test_unexpected_exception_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "boom_cmd.py").write_text("def main(argv):\n    raise RuntimeError('kaboom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "boom", Command("boom_cmd:main", "x"))
    code, out, err = run(["boom"], capsys)
    assert code == 2
    assert "internal error: RuntimeError: kaboom" in err
    assert "Traceback" not in out + err


def test_wired_subcommands_point_at_main_functions() -> None:
    for name in ("keys", "audit", "demo"):
        module, _, func = COMMANDS[name].target.partition(":")
        assert func == "main"
        assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_check_does_not_import_servers() -> None:
    code = (
        "import sys\n"
        "from bastion.cli import main\n"
        f"assert main(['check', {str(ROOT / 'rules')!r}]) == 0\n"
        "heavy = [m for m in ('uvicorn', 'starlette.applications', 'bastion.gateway',"
        " 'bastion.adapters.mcp', 'mcp', 'openai', 'anthropic') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---- check -------------------------------------------------------------------


def test_check_clean_policy_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["check", str(policy(tmp_path))], capsys)
    assert (code, err) == (0, "")
    assert out.strip() == "ok: 1 file, 5 rules"


def test_check_reports_errors_with_position_and_caret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(tmp_path, 'default call deny\nallow call "x" when args.a ==\nforbid tool "y"\n')
    code, _, err = run(["check", str(f)], capsys)
    assert code == 1
    lines = err.splitlines()
    assert any(line.startswith(f"{f}:2:") and ": error: " in line for line in lines)
    assert any(line.startswith(f"{f}:3:1: error: ") for line in lines)
    assert '   3 | forbid tool "y"' in lines
    assert "       ^^^^^^" in lines
    assert lines[-1] == "2 errors, 0 warnings"


def test_check_warnings_pass_unless_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(tmp_path, 'values unused = [1]\nforbid call "a"\n')
    code, out, err = run(["check", str(f)], capsys)
    assert code == 0
    assert f"{f}:1:1: warning: set 'unused' is declared but never used" in err
    assert "1 warning" in out
    code, _, err = run(["check", "--strict", str(f)], capsys)
    assert code == 1
    assert f"{f}:1:1: error: set 'unused'" in err


def test_check_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = policy(tmp_path, 'allow call "a" when identity.groups == "eng"\n')
    code, out, _ = run(["check", "--format", "json", str(f)], capsys)
    data = json.loads(out)
    assert code == 1
    assert data["ok"] is False
    (d,) = data["diagnostics"]
    assert (d["file"], d["line"], d["col"], d["code"]) == (str(f), 1, 21, "type-mismatch")


def test_check_with_schema_rejects_unknown_attributes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = tmp_path / "schema.yaml"
    schema.write_text("identity:\n  department: string\ntools:\n  mail__send: {}\n")
    f = policy(tmp_path, 'allow call "mail__send" when identity.departmnt == "ops"\n')
    code, _, err = run(["check", "--schema", str(schema), str(f)], capsys)
    assert code == 1
    assert "identity.departmnt" in err


def test_check_finds_static_problems_besides_compile_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(tmp_path, 'allow call nosuch\n@id("a") forbid call "x"\n@id("a") forbid call "y"\n')
    code, _, err = run(["check", str(f)], capsys)
    assert code == 1
    assert "undefined set 'nosuch'" in err
    assert "rule id 'a' is already used" in err


def test_check_reports_bad_redaction_entries_with_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(
        tmp_path, 'default result untrusted\nredact result "x__*" using ["emial", "phone("]\n'
    )
    code, _, err = run(["check", str(f)], capsys)
    assert code == 1
    lines = err.splitlines()
    assert any(
        line.startswith(f"{f}:2:1: error: 'using' entry 2 ('phone(')")
        and line.endswith("did you mean 'phone'?")
        for line in lines
    )
    assert any(
        line.startswith(f"{f}:2:1: warning: 'using' entry 1 ('emial')")
        and line.endswith("did you mean 'email'?")
        for line in lines
    )
    assert lines[-1] == "1 error, 1 warning"


def test_check_accepts_every_detector_and_group_name_in_using(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bastion.redaction import DETECTORS, GROUPS

    names = ", ".join(f'"{n}"' for n in (*DETECTORS, *GROUPS))
    f = policy(tmp_path, f'default result untrusted\nredact result "x__*" using [{names}]\n')
    code, out, err = run(["check", "--strict", str(f)], capsys)
    assert (code, err) == (0, "")
    assert out.strip() == "ok: 1 file, 1 rule"


def test_check_directory_loads_every_policy_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy(tmp_path, 'values admins = ["root"]\n', name="a.policy")
    policy(tmp_path, 'forbid call "x" unless identity.sub in admins\n', name="b.policy")
    code, out, _ = run(["check", str(tmp_path)], capsys)
    assert code == 0
    assert out.strip() == "ok: 2 files, 1 rule"


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "binary"])
def test_check_unreadable_input_is_an_error_not_a_crash(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "x.policy"
    if kind == "empty-dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif kind == "binary":
        target.write_bytes(b"\x00\xff\xfe\x80garbage")
    code, _, err = run(["check", str(target)], capsys)
    assert code == 1
    assert err.startswith(f"{target}:1:1: error: ")


# ---- fmt -------------------------------------------------------------------------

UGLY = "default   call deny ;\nallow call 'a'   when identity.sub=='x' # why\n"
PRETTY = 'default call deny\n\nallow call "a" when identity.sub == "x"  # why\n'


def test_fmt_rewrites_in_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = policy(tmp_path, UGLY)
    code, out, _ = run(["fmt", str(f)], capsys)
    assert code == 0
    assert f.read_text() == PRETTY
    assert out.strip() == f"reformatted {f}"


def test_fmt_check_reports_without_changing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(tmp_path, UGLY)
    code, out, _ = run(["fmt", "--check", str(f)], capsys)
    assert code == 1
    assert out.strip() == f"would reformat {f}"
    assert f.read_text() == UGLY


def test_fmt_check_passes_on_formatted_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy(tmp_path, PRETTY)
    assert run(["fmt", "--check", str(tmp_path)], capsys)[0] == 0


def test_fmt_leaves_a_broken_file_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = "allow call 'a' when\n"
    f = policy(tmp_path, broken)
    code, _, err = run(["fmt", str(f)], capsys)
    assert code == 1
    assert f"{f}:" in err and ": error: " in err
    assert f.read_text() == broken


def test_fmt_stdin_to_stdout(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(UGLY))
    code, out, _ = run(["fmt", "-"], capsys)
    assert (code, out) == (0, PRETTY)


def test_baseline_rules_are_formatted() -> None:
    assert main(["fmt", "--check", str(ROOT / "rules")]) == 0


# ---- test ----------------------------------------------------------------------


def test_test_command_passes_on_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["test", str(ROOT / "rules")], capsys)
    assert code == 0
    last = out.strip().splitlines()[-1]
    assert last.endswith(" passed, 0 failed")


def test_test_command_fails_on_a_failing_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy(tmp_path)
    (tmp_path / "p.test.yaml").write_text(
        textwrap.dedent(
            """\
            policy: p.policy
            cases:
              - {name: mail is allowed, call: mail__send, expect: allow}
              - {name: mail after taint, call: mail__send, context: {tainted: true}, expect: allow}
            """
        )
    )
    code, out, _ = run(["test", str(tmp_path)], capsys)
    assert code == 1
    assert f"PASS {tmp_path / 'p.test.yaml'}:3: mail is allowed" in out
    assert f"FAIL {tmp_path / 'p.test.yaml'}:4: mail after taint" in out
    assert "no-mail-after-taint" in out
    assert out.strip().splitlines()[-1] == "1 passed, 1 failed"


def test_test_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy(tmp_path)
    (tmp_path / "p.test.yaml").write_text(
        "policy: p.policy\ncases:\n  - {name: m, call: mail__send, expect: allow}\n"
    )
    code, out, _ = run(["test", "--format", "json", str(tmp_path)], capsys)
    assert code == 0
    assert json.loads(out)["passed"] == 1


# ---- explain ---------------------------------------------------------------------


def test_explain_call_prints_decision_and_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(tmp_path)
    code, out, _ = run(
        [
            "explain", "--policy", str(f), "--identity", '{"sub": "a"}',
            "--call", "mail__send", "--args", '{"to": "x@example.com"}',
            "--context", '{"tainted": true}',
        ],
        capsys,
    )  # fmt: skip
    assert code == 0
    assert out.splitlines()[0] == "effect: forbid"
    assert "reason: mail is blocked after taint" in out
    assert "[x] forbid" in out and "no-mail-after-taint" in out
    assert f"{f}:5" in out


def test_explain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = policy(tmp_path)
    argv = ["explain", "--policy", str(f), "--identity", '{"sub": "a", "groups": ["eng"]}']
    code, out, _ = run([*argv, "--call", "github__get_issue", "--format", "json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert (data["effect"], data["rule_ids"]) == ("allow", ["eng-reads"])
    assert any(t["rule_id"] == "eng-reads" and t["matched"] for t in data["trace"])


def test_explain_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = policy(tmp_path)
    argv = ["explain", "--policy", str(f), "--identity", '{"sub": "a"}']
    code, out, _ = run([*argv, "--list", "github__get_issue,mail__send"], capsys)
    assert code == 0
    assert out.splitlines()[0] == "visible: mail__send"


def test_explain_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = policy(tmp_path)
    argv = ["explain", "--policy", str(f), "--result", "web__fetch", "--output", '"<html>"']
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert out.splitlines()[0] == "effect: untrusted"


def test_explain_model_shows_route(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = policy(tmp_path)
    code, out, _ = run(["explain", "--policy", str(f), "--model", "gpt-4o-mini"], capsys)
    assert code == 0
    assert "route: openai" in out


def test_explain_uses_tool_annotations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = policy(tmp_path, "allow call * when tool.readOnlyHint == true\n")
    tools = '{"db__query": {"annotations": {"readOnlyHint": true}}}'
    code, out, _ = run(
        ["explain", "--policy", str(f), "--call", "db__query", "--tools", tools], capsys
    )
    assert code == 0
    assert out.splitlines()[0] == "effect: allow"


def test_explain_invalid_json_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(tmp_path)
    code, _, err = run(
        ["explain", "--policy", str(f), "--call", "x", "--args", "{not json"], capsys
    )
    assert code == 2
    assert "--args: invalid JSON" in err


def test_explain_broken_policy_prints_diagnostics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = policy(tmp_path, "allow cal *\n")
    code, _, err = run(["explain", "--policy", str(f), "--call", "x"], capsys)
    assert code == 1
    assert err.startswith(f"{f}:1:")


# ---- the installed script never shows a traceback -----------------------------------


@pytest.mark.parametrize("kind", ["broken", "binary", "directory", "missing"])
def test_installed_script_reports_bad_input_without_traceback(kind: str, tmp_path: Path) -> None:
    target = tmp_path / "p.policy"
    if kind == "broken":
        target.write_text('allow call "x" when\nforbid tool "y"\n@nope("z") allow call "q"\n')
    elif kind == "binary":
        target.write_bytes(bytes(range(256)) * 4)
    elif kind == "directory":
        target = tmp_path / "dir"
        (target / "sub.policy").mkdir(parents=True)  # a directory named like a policy file
    done = subprocess.run(
        [str(BASTION), "check", str(target)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert f"{target}" in done.stderr
    assert ": error: " in done.stderr


@pytest.mark.parametrize("command", ["fmt", "test", "explain"])
def test_installed_script_handles_garbage_for_every_command(command: str, tmp_path: Path) -> None:
    garbage = tmp_path / "g.test.yaml"
    garbage.write_bytes(b"\xff\xfe\x00\x01" * 50)
    argv = {
        "fmt": ["fmt", str(garbage)],
        "test": ["test", str(garbage)],
        "explain": ["explain", "--policy", str(garbage), "--call", "x"],
    }[command]
    done = subprocess.run([str(BASTION), *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert str(garbage) in done.stdout + done.stderr


def test_cli_module_exposes_the_command_table() -> None:
    assert set(COMMANDS) >= {"check", "fmt", "test", "explain", "serve", "demo", "keys", "audit"}
    assert cli.COMMANDS is COMMANDS
