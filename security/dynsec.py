"""Mosquitto dynamic-security ACLs: per-agent roles that also guard SUBSCRIBE.

Why: Mosquitto's acl_file grants every SUBSCRIBE, so an agent may join another
agent's shared-subscription group and take (and lose) its turn of that agent's
commands. The dynamic-security plugin checks subscriptions too, including the
`$share/<group>/` prefix, so each agent gets a role that allows exactly its own
group. Roles are literal per agent (the plugin does not substitute %u in 2.0), so
enrolment adds a client + role at runtime through `$CONTROL/dynamic-security/v1`
(no restart), and revocation deletes the client and its role, which also cuts its
live connection (the CRL alone only stops new TLS handshakes after a SIGHUP).
"""

from __future__ import annotations

import json
import shutil
import ssl
import threading
import uuid
from pathlib import Path
from typing import Any

from .pki import validate_identity

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
COORDINATOR_ROLE = "edgeledger-coordinator"
#: Never agents, whatever the coordinator identity is configured to.
RESERVED_NAMES = ("coordinator", "broker")
PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)


class DynsecError(RuntimeError):
    """The broker's dynamic-security plugin refused or did not answer a command."""


def find_plugin() -> Path:
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    found = shutil.which("mosquitto_dynamic_security.so")
    if found:
        return Path(found)
    raise DynsecError("mosquitto_dynamic_security.so not found: install mosquitto 2.x or use acl_mode='file'")


def agent_role_name(agent_id: str) -> str:
    return f"agent-{agent_id}"


def agent_acls(agent_id: str, prefix: str, queue_prefix: str, ingest: str, reply: str) -> list[dict[str, Any]]:
    """What one agent may do: its own queue (subscribe + receive), ingest and replies (send).

    Nothing of Celery's remote control (`<prefix>/f/celery.pidbox`, pidbox queues, control
    replies) or events (`<prefix>/t/celeryev/...`): only coordinator certificates may
    command or watch workers (security/README.md "Remote control").
    """
    queue = f"{queue_prefix}{agent_id}"
    own = [f"{prefix}/d/{queue}/{queue}", f"{prefix}/d/amq.default/{queue}"]
    acls: list[dict[str, Any]] = []
    for topic in own:
        acls.append({"acltype": "subscribeLiteral", "topic": f"$share/{queue}/{topic}", "allow": True})
        acls.append({"acltype": "publishClientReceive", "topic": topic, "allow": True})
    for topic in (f"{prefix}/d/{ingest}/{ingest}", f"{prefix}/d/amq.default/{ingest}", f"{prefix}/d/{reply}/+"):
        acls.append({"acltype": "publishClientSend", "topic": topic, "allow": True})
    return acls


def coordinator_acls() -> list[dict[str, Any]]:
    acls = []
    for topic in ("#", "$share/#", "$CONTROL/dynamic-security/#"):
        acls.append({"acltype": "subscribePattern", "topic": topic, "allow": True})
    for topic in ("#", "$CONTROL/dynamic-security/#"):
        acls.append({"acltype": "publishClientSend", "topic": topic, "allow": True})
        acls.append({"acltype": "publishClientReceive", "topic": topic, "allow": True})
    return acls


def render_dynsec_config(
    agent_ids: tuple[str, ...] | list[str],
    coordinator_identities: tuple[str, ...],
    *,
    prefix: str = "kombu",
    queue_prefix: str = "agent.",
    ingest: str = "edge.ingest",
    reply: str = "c.rep",
) -> dict[str, Any]:
    """The plugin's JSON state: deny by default, one role per agent, full coordinator."""
    clients: list[dict[str, Any]] = [
        {"username": validate_identity(name), "roles": [{"rolename": COORDINATOR_ROLE}]}
        for name in coordinator_identities
    ]
    roles: list[dict[str, Any]] = [{"rolename": COORDINATOR_ROLE, "acls": coordinator_acls()}]
    for agent_id in sorted(set(agent_ids) - set(coordinator_identities) - set(RESERVED_NAMES)):
        validate_identity(agent_id)
        clients.append({"username": agent_id, "roles": [{"rolename": agent_role_name(agent_id)}]})
        roles.append({"rolename": agent_role_name(agent_id),
                      "acls": agent_acls(agent_id, prefix, queue_prefix, ingest, reply)})
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def add_agent_commands(agent_id: str, *, prefix: str = "kombu", queue_prefix: str = "agent.",
                       ingest: str = "edge.ingest", reply: str = "c.rep") -> list[dict[str, Any]]:
    validate_identity(agent_id)
    if agent_id in RESERVED_NAMES:
        raise DynsecError(f"{agent_id!r} is reserved for the coordinator/broker and cannot get agent rights")
    role = agent_role_name(agent_id)
    return [
        {"command": "createRole", "rolename": role,
         "acls": agent_acls(agent_id, prefix, queue_prefix, ingest, reply)},
        {"command": "createClient", "username": agent_id, "roles": [{"rolename": role}]},
    ]


def add_coordinator_commands(name: str) -> list[dict[str, Any]]:
    """Another coordinator (a peer sharing the ingest queue): the coordinator role, by CN."""
    validate_identity(name)
    if name in RESERVED_NAMES:
        raise DynsecError(f"{name!r} is reserved: a peer coordinator needs its own name")
    return [{"command": "createClient", "username": name, "roles": [{"rolename": COORDINATOR_ROLE}]}]


def remove_agent_commands(agent_id: str) -> list[dict[str, Any]]:
    """Revoke at the broker: the client is disconnected now, and since its role is gone
    any reconnection falls back to deny-all. (disableClient alone does not stop a
    certificate-authenticated client from reconnecting with its old rights.)"""
    validate_identity(agent_id)
    return [
        {"command": "deleteClient", "username": agent_id},
        {"command": "deleteRole", "rolename": agent_role_name(agent_id)},
    ]


def send_commands(host: str, port: int, ssl_options: dict[str, str], commands: list[dict[str, Any]],
                  timeout: float = 10.0, tolerate: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Run dynamic-security commands as a coordinator identity; raise DynsecError on failure.

    tolerate: error texts to accept (e.g. "Role already exists" when re-adding).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dynsec-admin-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ssl_options["ca_certs"])
    ctx.load_cert_chain(ssl_options["certfile"], ssl_options["keyfile"])
    client.tls_set_context(ctx)
    subscribed, answered = threading.Event(), threading.Event()
    responses: list[dict[str, Any]] = []

    def on_subscribe(_c, _u, _mid, codes, _p):
        if all(c.value < 0x80 for c in codes):
            subscribed.set()

    def on_message(_c, _u, msg):
        try:
            responses.extend(json.loads(msg.payload).get("responses", []))
        except ValueError:
            return
        answered.set()

    client.on_subscribe, client.on_message = on_subscribe, on_message
    try:
        client.connect(host, port)
    except (OSError, ssl.SSLError) as exc:
        raise DynsecError(f"cannot reach the broker at {host}:{port} for dynsec commands: {exc}") from exc
    client.loop_start()
    try:
        client.subscribe(RESPONSE_TOPIC, qos=1)
        if not subscribed.wait(timeout):
            raise DynsecError("the broker refused the dynsec response topic: is this identity a coordinator?")
        client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1).wait_for_publish(timeout)
        if not answered.wait(timeout):
            raise DynsecError("no answer from the dynamic-security plugin: is acl_mode='dynsec' configured?")
    finally:
        client.disconnect()
        client.loop_stop()
    errors = [r for r in responses if r.get("error") and not any(t in r["error"] for t in tolerate)]
    if errors:
        raise DynsecError("; ".join(f"{r.get('command')}: {r['error']}" for r in errors))
    return responses
