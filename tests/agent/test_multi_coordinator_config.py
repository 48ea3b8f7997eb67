"""An agent of a fleet with several coordinators (docs/OPERATIONS.md "Several coordinators"):
witness mode follows one coordinator's log, so several command signers need `witness = false`,
and then a receipt alone confirms (its checkpoint part, from whichever coordinator, is not
mixed into one pinned log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import AgentError

SIGNERS = "coordinator,coordinator-b"


def test_several_command_signers_with_witness_on_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match=r"witness = true follows one coordinator's log.*set\s+witness = false"):
        load_config(tmp_path, env={"EDGE_AGENT_COMMAND_SIGNERS": SIGNERS})


def test_several_command_signers_with_witness_off_load(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, env={"EDGE_AGENT_COMMAND_SIGNERS": SIGNERS, "EDGE_AGENT_WITNESS": "false"})
    assert cfg.command_signers == ["coordinator", "coordinator-b"] and cfg.witness is False
    assert load_config(tmp_path, env={}).witness is True  # one coordinator: witness mode stays the default
