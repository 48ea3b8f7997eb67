"""Per-agent broker rights at runtime when `broker.acl_mode = "dynsec"`.

Why: with Mosquitto's acl_file a revoked agent keeps its live connection until it
reconnects (the CRL is checked at the TLS handshake only); the signature checks
refuse its tasks meanwhile. With the dynamic-security plugin, `enroll` adds the
agent's client + role to the running broker and `revoke` deletes them, which cuts the
live connection at once. When the broker is not running, nothing is sent: the managed
broker's dynsec state is rendered from the issued, unrevoked certificates at start.
"""

from __future__ import annotations

from .config import CoordinatorConfig
from .errors import CoordinatorError
from .supervisor import port_open


def _apply(cfg: CoordinatorConfig, commands: list, tolerate: tuple[str, ...]) -> str:
    from security.dynsec import DynsecError, send_commands

    from .celery_app import ssl_options

    if not port_open(cfg.broker.port, cfg.broker.host):
        return "broker not running: the agent's rights are applied when it starts"
    try:
        send_commands(cfg.broker.host, cfg.broker.port, ssl_options(cfg), commands, tolerate=tolerate)
    except DynsecError as exc:
        raise CoordinatorError(f"the broker's dynamic-security plugin refused the change ({exc}): check broker.acl_mode") from None
    return "broker rights updated (dynamic security)"


def agent_enrolled(cfg: CoordinatorConfig, agent_id: str) -> str | None:
    if cfg.broker.acl_mode != "dynsec" or not cfg.managed_broker:
        return None
    from security.dynsec import add_agent_commands

    return _apply(cfg, add_agent_commands(agent_id), tolerate=("already exists",))


def agent_revoked(cfg: CoordinatorConfig, agent_id: str) -> str | None:
    if cfg.broker.acl_mode != "dynsec" or not cfg.managed_broker:
        return None
    from security.dynsec import remove_agent_commands

    return _apply(cfg, remove_agent_commands(agent_id), tolerate=("not found",))


def peer_added(cfg: CoordinatorConfig, name: str) -> str | None:
    """A peer coordinator gets the coordinator's rights on the running managed broker (and at every start)."""
    if cfg.broker.acl_mode != "dynsec" or not cfg.managed_broker:
        return None
    from security.dynsec import add_coordinator_commands

    return _apply(cfg, add_coordinator_commands(name), tolerate=("already exists",))
