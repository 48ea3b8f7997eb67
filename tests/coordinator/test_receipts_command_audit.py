"""Command results carry their real status, the command name and its args digest, and
`edge-audit list/show` say which command ran (issue #11).

Real processes: `edge-coordinator run` (Mosquitto with mutual TLS, anvil), a real
`edge-agent run`, `edge-coordinator send` as a subprocess and `edge-audit` as a
subprocess. `set_interval abc` is the issue's example of a command that fails on the
device: today's `send` refuses it before sending (the contract's signature check), so
the device-side failure is produced by the same `send_command` with that check skipped,
as an older or third-party sender would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator import dispatch
from coordinator.config import load_config
from coordinator.ingest import canonical_digest
from security import exit_codes
from tests.agent.support import Proc

from .support import CoordinatorProcess, audit, cli, wait_until
from .test_receipts_e2e import enroll, run_agent

pytestmark = pytest.mark.slow


def journaled_result(coordinator: CoordinatorProcess, command_task_id: str) -> tuple:
    rows = wait_until(lambda: coordinator.query(
        "SELECT task_id, command, status, args_digest FROM command_results WHERE command_task_id = ?",
        (command_task_id,)), 60, f"the result of command {command_task_id} journaled")
    (row,) = rows
    return row


def fields(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


def test_failed_and_successful_commands_are_listed_and_shown_with_name_and_args_digest(
        coordinator: CoordinatorProcess, tmp_path: Path, procs: list[Proc], monkeypatch: pytest.MonkeyPatch) -> None:
    coordinator.init("ca-a").start()
    procs.append(run_agent(enroll(coordinator, "ca-a", tmp_path / "ca-a"), "3600", "run.log"))
    wait_until(lambda: coordinator.readings() >= 1, 90, "the agent's first reading")

    # the CLI refuses `set_interval abc` up front: nothing recorded, nothing sent
    refused = cli("send", "--data-dir", str(coordinator.data_dir), "ca-a", "set_interval", "abc", "--timeout", "60")
    assert refused.returncode == exit_codes.USAGE and "seconds" in refused.stderr, refused.stderr
    assert coordinator.query("SELECT COUNT(*) FROM commands") == [(0,)]

    # the same command sent without that check fails on the device (float("abc"))
    monkeypatch.setattr(dispatch, "check_call",
                        lambda task, args, kwargs: (dispatch.command_name(task), dispatch.parse_args(args)))
    failed = dispatch.send_command(load_config(data_dir=coordinator.data_dir), "ca-a", "set_interval", ["abc"],
                                   timeout=120)
    assert failed["status"] == "FAILURE" and "abc" in failed["result"], failed
    monkeypatch.undo()
    ok = cli("send", "--data-dir", str(coordinator.data_dir), "ca-a", "status", "--timeout", "120", "--json")
    assert ok.returncode == 0, ok.stderr
    ok_id = json.loads(ok.stdout)["task_id"]

    abc_digest, status_digest = canonical_digest(["abc"]), canonical_digest([])
    failed_result, command, status, digest = journaled_result(coordinator, failed["task_id"])
    assert (command, status, digest) == ("edge.agent.set_interval", "FAILURE", abc_digest)
    ok_result, command, status, digest = journaled_result(coordinator, ok_id)
    assert (command, status, digest) == ("edge.agent.status", "SUCCESS", status_digest)

    # list --status FAILURE: exactly the failed set_interval abc, naming the command and its args
    listed = audit(coordinator.data_dir, "list", "--status", "FAILURE", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["task_id"], r["task_name"], r["agent_id"], r["status"], r["command"], r["command_task_id"],
             r["command_args_digest"]) for r in json.loads(listed.stdout)] == [
        (failed_result, "edge.command_result", "ca-a", "FAILURE", "edge.agent.set_interval", failed["task_id"],
         abc_digest)]
    table = audit(coordinator.data_dir, "list", "--status", "FAILURE")
    assert table.returncode == 0, table.stderr
    (row,) = [f for f in fields(table.stdout) if f and f[0] == failed_result]
    assert row[-3:] == ["set_interval", "args", abc_digest[:16]] and "FAILURE" in row
    assert "1 records" in table.stdout

    # both command results in the table; readings carry no command column
    table = audit(coordinator.data_dir, "list")
    rows = {f[0]: f for f in fields(table.stdout) if f}
    assert rows[failed_result][-3:] == ["set_interval", "args", abc_digest[:16]]
    assert rows[ok_result][-3:] == ["status", "args", status_digest[:16]] and "SUCCESS" in rows[ok_result]
    reading = coordinator.query("SELECT task_id FROM readings LIMIT 1")[0][0]
    assert "args" not in rows[reading]

    # show (text and JSON) names the command, its task id and its args digest
    shown = audit(coordinator.data_dir, "show", failed_result)
    assert shown.returncode == 0, shown.stderr
    lines = fields(shown.stdout)
    assert ["status", "FAILURE"] in lines and ["command", "edge.agent.set_interval"] in lines
    assert ["command_args_digest", abc_digest] in lines and ["command_task_id", failed["task_id"]] in lines
    shown = json.loads(audit(coordinator.data_dir, "--json", "show", ok_result).stdout)
    assert (shown["status"], shown["command"], shown["command_args_digest"]) == (
        "SUCCESS", "edge.agent.status", status_digest)
    assert "command" not in json.loads(audit(coordinator.data_dir, "--json", "show", reading).stdout)
