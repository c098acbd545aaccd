"""Loading policies from files: directories, includes, cycles, schemas, reload and the watcher."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bastion import Effect, Identity, Policy, PolicyError, Schema, ToolSpec

ALICE = Identity("alice", groups=("eng",))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_directory_loads_every_policy_file_sorted(tmp_path: Path) -> None:
    write(tmp_path / "b.policy", '@id("b") allow call "x"')
    write(tmp_path / "a.policy", '@id("a") allow call "x"')
    write(tmp_path / "notes.txt", "not a policy")
    p = Policy.load(tmp_path)
    assert [os.path.basename(f) for f in p.files] == ["a.policy", "b.policy"]
    assert p.decide_call(ALICE, "x", {}).rule_ids == ("a", "b")


def test_include_resolves_relative_to_the_including_file(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "base.policy", "tools outward = ['slack__*']\ndefault call allow")
    main = write(tmp_path / "main.policy", 'include "sub/base.policy"\nforbid call outward')
    p = Policy.load(main)
    assert p.decide_call(ALICE, "slack__post", {}).effect is Effect.FORBID
    assert p.decide_call(ALICE, "github__get", {}).effect is Effect.ALLOW
    assert len(p.files) == 2


def test_a_file_reached_twice_is_loaded_once(tmp_path: Path) -> None:
    write(tmp_path / "common.policy", "tools t = ['x']")
    write(tmp_path / "a.policy", 'include "common.policy"\nallow call t')
    write(tmp_path / "b.policy", 'include "common.policy"')
    p = Policy.load(tmp_path)
    assert sorted(os.path.basename(f) for f in p.files) == ["a.policy", "b.policy", "common.policy"]


def test_include_cycle_is_an_error_at_the_include(tmp_path: Path) -> None:
    write(tmp_path / "a.policy", 'include "b.policy"')
    write(tmp_path / "b.policy", 'allow call *\ninclude "a.policy"')
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path / "a.policy")
    (d,) = info.value.diagnostics
    assert (
        d.file.endswith("b.policy")
        and d.line == 2
        and "include cycle: a.policy -> b.policy -> a.policy" in d.message
    )


def test_missing_include_is_an_error_at_the_include(tmp_path: Path) -> None:
    write(tmp_path / "a.policy", 'allow call *\ninclude "nope.policy"')
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path / "a.policy")
    (d,) = info.value.diagnostics
    assert (d.line, d.col) == (2, 1) and "cannot read" in d.message


def test_errors_from_several_files_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path / "a.policy", "allow call *\nallow cal 'x'\ntools s = ['a']\ndefault call allow")
    write(tmp_path / "b.policy", "tools s = ['b']\ndefault call deny\nallow call undefined_set")
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path)
    files = {(os.path.basename(d.file), d.line) for d in info.value.diagnostics}
    assert ("a.policy", 2) in files


def test_cross_file_semantic_errors(tmp_path: Path) -> None:
    write(tmp_path / "a.policy", "tools s = ['a']\ndefault call allow")
    write(tmp_path / "b.policy", "tools s = ['b']\ndefault call deny\nallow call undefined_set")
    with pytest.raises(PolicyError) as info:
        Policy.load(tmp_path)
    found = {(os.path.basename(d.file), d.line, d.code) for d in info.value.diagnostics}
    assert found == {
        ("b.policy", 1, "duplicate-set"),
        ("b.policy", 2, "conflicting-default"),
        ("b.policy", 3, "compile"),
    }


def test_missing_path_is_an_error() -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        Policy.load("/nonexistent/dir/x.policy")


# ---- schema -----------------------------------------------------------------------


def test_schema_declares_tool_effect_destinations_and_annotations(tmp_path: Path) -> None:
    schema = write(
        tmp_path / "schema.yaml",
        "identity:\n  groups: list[string]\ntools:\n  pay__send:\n    description: Send money\n"
        "    effect: send\n    destinations: [iban]\n    annotations: {destructiveHint: true}\n",
    )
    pol = write(
        tmp_path / "p.policy",
        "default call allow\nask call * when tool.effect == 'send' and tool.destructiveHint\n"
        "forbid call * when destinations has 'EVIL' and tool.description startswith 'Send'",
    )
    p = Policy.load(pol, schema=schema)
    assert isinstance(p.schema, Schema) and p.schema.tools["pay__send"].effect == "send"
    assert p.decide_call(ALICE, "pay__send", {"iban": "DE1"}).effect is Effect.ASK
    assert p.decide_call(ALICE, "pay__send", {"iban": "EVIL"}).effect is Effect.FORBID
    spec = ToolSpec.named("pay__send", annotations={"destructiveHint": False})
    assert p.decide_call(ALICE, spec, {"iban": "x"}).effect is Effect.ASK  # the schema wins
    assert p.decide_call(ALICE, "other", {"iban": "EVIL"}).effect is Effect.ALLOW


def test_invalid_schema_is_a_policy_error(tmp_path: Path) -> None:
    schema = write(
        tmp_path / "s.yaml", "identity:\n  groups: lists\ntools:\n  t: {effect: explode}\n"
    )
    with pytest.raises(PolicyError) as info:
        Policy.from_source("allow call *", schema=schema)
    messages = " ".join(d.message for d in info.value.diagnostics)
    assert "unknown type 'lists'" in messages and "tools.t.effect" in messages


def test_schema_with_bad_yaml_points_at_the_line(tmp_path: Path) -> None:
    schema = write(tmp_path / "s.yaml", "tools:\n  a: [\n")
    with pytest.raises(PolicyError) as info:
        Schema.load(schema)
    assert info.value.diagnostics[0].line >= 2


# ---- reload -----------------------------------------------------------------------


def test_reload_picks_up_changes(tmp_path: Path) -> None:
    f = write(tmp_path / "p.policy", "allow call 'x'")
    p = Policy.load(f)
    assert p.decide_call(ALICE, "x", {}).allowed
    write(f, "forbid call 'x' reason 'changed'\nallow call 'x'")
    assert p.reload() == ()
    assert p.decide_call(ALICE, "x", {}).reasons == ("changed",)


def test_failed_reload_keeps_the_old_policy_and_raises(tmp_path: Path) -> None:
    f = write(tmp_path / "p.policy", "allow call 'x'")
    p = Policy.load(f)
    write(f, "allow call 'x' when (")
    with pytest.raises(PolicyError) as info:
        p.reload()
    assert info.value.diagnostics[0].file == str(f)
    assert p.decide_call(ALICE, "x", {}).allowed
    assert p.sources[str(f)] == "allow call 'x'"


def test_reload_swaps_atomically_while_other_threads_decide(tmp_path: Path) -> None:
    # Version A allows x and forbids y; version B the reverse. A decision that saw
    # half of each would allow both or forbid both.
    a = "allow call 'x'\nforbid call 'y'\n" + "allow call 'z' when args.n > 1\n" * 200
    b = "forbid call 'x'\nallow call 'y'\n" + "allow call 'z' when args.n > 1\n" * 200
    f = write(tmp_path / "p.policy", a)
    p = Policy.load(f)
    stop = threading.Event()
    bad: list[str] = []

    def decide() -> None:
        while not stop.is_set():
            # One decision per version check: read both through one snapshot per call.
            x = p.decide_call(ALICE, "x", {}).effect
            if x not in (Effect.ALLOW, Effect.FORBID):
                bad.append(f"x {x}")
            d = p.decide_call(ALICE, "y", {})
            if d.reasons == ("policy evaluation error",):
                bad.append("error")

    threads = [threading.Thread(target=decide) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            write(f, b if i % 2 == 0 else a)
            p.reload()
            pair = {p.decide_call(ALICE, n, {}).effect for n in ("x", "y")}
            assert pair == {Effect.ALLOW, Effect.FORBID}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert bad == []


def test_reload_of_a_policy_from_source_recompiles_its_text() -> None:
    p = Policy.from_source("allow call 'x'")
    assert p.reload() == () and p.decide_call(ALICE, "x", {}).allowed


def test_watcher_reloads_on_change_and_reports_failures(tmp_path: Path) -> None:
    f = write(tmp_path / "p.policy", "allow call 'x'")
    p = Policy.load(f)
    events: list[PolicyError | None] = []
    changed = threading.Event()

    def on_reload(err: PolicyError | None) -> None:
        events.append(err)
        changed.set()

    p.watch(interval=0.02, on_reload=on_reload)
    try:
        write(f, "forbid call 'x'")
        bump_mtime(f)
        assert changed.wait(5)
        assert events == [None] and p.decide_call(ALICE, "x", {}).effect is Effect.FORBID
        changed.clear()
        write(f, "forbid call 'x' when (")
        bump_mtime(f)
        assert changed.wait(5)
        assert isinstance(events[-1], PolicyError)
        assert p.decide_call(ALICE, "x", {}).effect is Effect.FORBID
        changed.clear()
        write(tmp_path / "q.policy", "allow call 'new'")
        assert not changed.wait(0.2)  # a single-file load does not watch the directory
    finally:
        p.stop_watching()


def test_watcher_on_a_directory_sees_new_files(tmp_path: Path) -> None:
    write(tmp_path / "a.policy", "allow call 'x'")
    p = Policy.load(tmp_path, watch=False)
    done = threading.Event()
    p.watch(interval=0.02, on_reload=lambda err: done.set())
    try:
        write(tmp_path / "b.policy", "allow call 'y'")
        assert done.wait(5)
        deadline = time.monotonic() + 5
        while p.rule_count != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.decide_call(ALICE, "y", {}).allowed
    finally:
        p.stop_watching()
