"""agent.lazy: deferred stdlib modules survive other importers and load on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_fresh(code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter: the test process has these modules imported already."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_deferred_module_is_not_run_by_import_statements_and_runs_in_place_on_use() -> None:
    proc = run_fresh("""
        import sys
        from agent import lazy
        assert lazy.defer("csv") and lazy.is_deferred("csv")
        import csv                       # what importlib.metadata does at module level
        from importlib import metadata   # the real importer: must not run csv
        assert lazy.is_deferred("csv"), "an import statement ran the deferred module"
        import io
        buf = io.StringIO()
        csv.writer(buf).writerow(["a", 1])  # first use runs the module in the same object
        assert buf.getvalue() == "a,1\\r\\n" and not lazy.is_deferred("csv") and sys.modules["csv"] is csv
        assert not lazy.defer("csv")     # already real: left alone
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_agent_deferrals_keep_paho_and_kombu_importable_and_unused_modules_unrun() -> None:
    proc = run_fresh("""
        import sys
        from agent import lazy
        assert lazy.defer_unused() == list(lazy.AGENT_DEFERRED)
        import paho.mqtt.client, kombu, celery.worker, kombu_mqtt.transport, agent.app
        print(sorted(n for n in lazy.AGENT_DEFERRED if lazy.is_deferred(n)))
        print("http.client" in sys.modules)
        import urllib.request
        assert urllib.request.getproxies() is not None  # still works when someone needs it
        assert not lazy.is_deferred("urllib.request") and "http.client" in sys.modules
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    deferred, http_loaded, ok = proc.stdout.split("\n")[:3]
    assert deferred == "['csv', 'urllib.request']"
    assert http_loaded == "False" and ok == "ok"


def test_defer_of_an_unknown_module_is_a_no_op() -> None:
    proc = run_fresh("""
        from agent import lazy
        assert not lazy.defer("no_such_module_here")
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
