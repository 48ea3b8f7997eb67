"""agent.takeover: what a device does with the transport's takeover reports (no broker needed).

Each report adds to the mark kept in the outbox (what `status` and the heartbeat show);
the ERROR line naming the cause and the fix appears once per LOG_EVERY, not per report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.takeover import LOG_EVERY, TakeoverReporter, takeover_state


def test_reports_accumulate_and_log_once_per_period(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    box = Outbox(tmp_path / "outbox.sqlite3", "dup-9", 1000)
    now = [1000.0]
    reporter = TakeoverReporter("dup-9", lambda: box, clock=lambda: now[0])
    assert takeover_state(box) is None
    with caplog.at_level(logging.ERROR, logger="edge.agent"):
        reporter("edge-agent-dup-9", 3, 5.0)
        now[0] += 10
        reporter("edge-agent-dup-9", 4, 10.0)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1
        assert "another device is connected with agent id 'dup-9'" in errors[0].getMessage()
        assert "give it its own identity" in errors[0].getMessage()
        now[0] += LOG_EVERY
        reporter("edge-agent-dup-9", 5, 20.0)
        assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2
    mark = takeover_state(box)
    assert mark == {"count": 3, "first_at": 1000.0, "last_at": 1000.0 + 10 + LOG_EVERY, "pause": 20.0}
    box.close()
