"""Calendar expressions against `systemd-analyze calendar`, the reference (from
test_agent_config.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from kdumpling.agent.calendar import parse_calendar

from tests import tiers
from tests.test_agent_config import CALENDARS, _systemd_next


@pytest.mark.parametrize("expr", CALENDARS)
def test_calendar_matches_systemd(expr: str) -> None:
    tiers.tool("systemd", "systemd-analyze")
    spec = parse_calendar(expr + " UTC")
    for _ in range(3):  # a second boundary between the two calls: ask again
        before = time.time()
        want = _systemd_next(expr)
        ours = spec.next_after(before)
        got = datetime.fromtimestamp(ours, UTC).replace(tzinfo=None) if ours else None
        if got == want or int(time.time()) == int(before):
            break
    assert got == want
