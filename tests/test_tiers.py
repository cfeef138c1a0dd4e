"""tests/tiers.py, the one place that skips or fails a test whose tier cannot run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import tiers


def test_missing_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tiers.REQUIRE_ALL_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="readers tier: crash is not installed"):
        tiers.missing("readers", "crash is not installed")


def test_missing_fails_under_require_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiers.REQUIRE_ALL_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match=r"ptrace tier: gdb .*REQUIRE_ALL=1"):
        tiers.missing("ptrace", "gdb is not installed")


def test_not_applicable_skips_even_under_require_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiers.REQUIRE_ALL_VARIABLE, "1")
    with pytest.raises(pytest.skip.Exception, match="core_pattern pipes"):
        tiers.not_applicable("core_pattern pipes")


def test_tool_and_module_answer_or_go_through_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tiers.REQUIRE_ALL_VARIABLE, "1")
    assert Path(tiers.tool("lint", "sh")).name == "sh"
    assert tiers.module("lint", "json").dumps([]) == "[]"
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-kdl is not installed"):
        tiers.tool("lint", "no-such-tool-kdl")
    with pytest.raises(pytest.fail.Exception, match="cannot import no_such_module_kdl"):
        tiers.module("lint", "no_such_module_kdl")


def test_ptrace_needs_the_capability_and_a_scope_that_allows_attaching(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tiers, "which", lambda name: f"/usr/bin/{name}")
    scope = tmp_path / "ptrace_scope"
    monkeypatch.setattr(tiers, "YAMA_SCOPE", scope)
    monkeypatch.setattr(tiers, "_effective_capabilities", lambda: 0)
    assert "CAP_SYS_PTRACE" in tiers.lacking_ptrace()
    monkeypatch.setattr(tiers, "_effective_capabilities", lambda: 1 << tiers.CAP_SYS_PTRACE)
    assert tiers.lacking_ptrace() == ""  # no Yama at all
    for value, ok in (("0", True), ("1", True), ("2", True), ("3", False)):
        scope.write_text(value + "\n")
        assert (tiers.lacking_ptrace() == "") is ok, value
    scope.write_text("1\n")
    monkeypatch.setattr(tiers, "which", lambda name: None if name == "eu-stack" else name)
    assert tiers.lacking_ptrace().startswith("eu-stack not installed")


def test_gate_skips_only_the_tiers_a_test_is_marked_with(monkeypatch: pytest.MonkeyPatch,
                                                          request: pytest.FixtureRequest) -> None:
    monkeypatch.delenv(tiers.REQUIRE_ALL_VARIABLE, raising=False)
    monkeypatch.setitem(tiers.GATES, "readers", lambda: "crash missing")
    tiers._lacking.cache_clear()
    try:
        tiers.gate(request.node)  # this test is unmarked: nothing happens
        request.node.add_marker(pytest.mark.readers)
        with pytest.raises(pytest.skip.Exception, match="readers tier: crash missing"):
            tiers.gate(request.node)
    finally:
        tiers._lacking.cache_clear()
