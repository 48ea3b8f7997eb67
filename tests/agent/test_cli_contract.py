"""The command signatures `edge-coordinator send` checks (security/contract.py) are the
agent's real task signatures: same commands, same parameter names, same optionality."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from celery import Celery

from agent.app import register_tasks
from security.contract import AGENT_COMMAND_PARAMS, AGENT_COMMANDS


def test_contract_signatures_match_the_agent_tasks() -> None:
    app = Celery("t", set_as_current=False)
    register_tasks(app, SimpleNamespace())  # the runtime is only called when a task runs
    assert set(AGENT_COMMAND_PARAMS) == set(AGENT_COMMANDS)
    for name, params in AGENT_COMMAND_PARAMS.items():
        real = inspect.signature(app.tasks[name].run).parameters
        assert [p.name for p in params] == list(real), name
        assert [p.required for p in params] == [q.default is inspect.Parameter.empty for q in real.values()], name
