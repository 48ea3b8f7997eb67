"""Push the fleet CRL to agents: signed `edge.agent.update_crl(crl_pem)` commands.

Why: an agent checks the coordinator's signatures against its own copy of the CRL.
That copy came with its enrollment bundle; without pushes it would never learn of a
revocation, and past the CRL's next-update it refuses commands (fail closed). So
`revoke` pushes the new CRL at once, and the daemon re-issues and pushes it every
`pki.crl_refresh` seconds, well before `pki.crl_validity` runs out. The CRL carries
the CA's own signature, so an agent verifies it independently of this message.

A push to an agent whose queue has no session (never ran, or its session expired)
is skipped: PUBACK 0x10 means nobody would ever read it; the next push reaches it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .config import CoordinatorConfig
from .errors import CoordinatorError

log = logging.getLogger("edgeledger.coordinator.crl")

UPDATE_CRL = "edge.agent.update_crl"


@dataclass
class PushReport:
    sent: list[str] = field(default_factory=list)
    no_session: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"CRL pushed to {len(self.sent)} agent(s)"]
        if self.no_session:
            parts.append(f"{len(self.no_session)} without a broker session (next push reaches them)")
        if self.failed:
            parts.append("failed: " + ", ".join(f"{a} ({e})" for a, e in self.failed.items()))
        return "; ".join(parts)


def push_crl(cfg: CoordinatorConfig, agents: list[str]) -> PushReport:
    """Send the current CRL file to each agent's queue; never raises for one agent."""
    from kombu.exceptions import OperationalError

    from .celery_app import make_app

    report = PushReport()
    if not agents:
        return report
    crl_pem = cfg.crl_path.read_text()
    from kombu_mqtt import NoSubscribersError

    app = make_app(cfg, consumer=False)
    try:
        for agent in agents:
            try:
                app.send_task(UPDATE_CRL, kwargs={"crl_pem": crl_pem}, queue=f"agent.{agent}", retry=False,
                              ignore_result=True)
                report.sent.append(agent)
            except NoSubscribersError:
                report.no_session.append(agent)
            except (OperationalError, OSError, CoordinatorError) as exc:
                report.failed[agent] = str(exc).splitlines()[0][:200]
                if isinstance(exc, OperationalError):
                    break  # the broker is away: the others would fail the same way
    finally:
        app.close()
    log.info("%s", report.summary())
    return report
