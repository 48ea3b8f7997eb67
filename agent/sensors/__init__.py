"""Sensor drivers and their discovery.

Drivers register in the `edgeledger.sensors` entry-point group (a plugin package
adds its own). The built-ins are also listed here, so a frozen binary, which has no
package metadata, still finds them.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points

from ..errors import AgentError
from .base import Sample, Sensor, SensorError

GROUP = "edgeledger.sensors"
BUILTIN = {
    "simulated": "agent.sensors.simulated:SimulatedSensor",
    "linux": "agent.sensors.linux:LinuxSensor",
}

__all__ = ["Sample", "Sensor", "SensorError", "available", "load_sensor", "load_sensors"]


def available() -> dict[str, str]:
    """name -> "module:attr" for every installed driver (entry points win over built-ins)."""
    found = dict(BUILTIN)
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def _resolve(target: str) -> type:
    module, _, attr = target.partition(":")
    obj = import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def load_sensor(name: str, agent_id: str) -> Sensor:
    drivers = available()
    if name not in drivers:
        raise AgentError(f"unknown sensor {name!r}: installed drivers are {', '.join(sorted(drivers))}")
    try:
        cls = _resolve(drivers[name])
    except (ImportError, AttributeError) as exc:
        raise AgentError(f"sensor {name!r} ({drivers[name]}) cannot be loaded: {exc}") from exc
    sensor = cls(agent_id)
    if not isinstance(sensor, Sensor):
        raise AgentError(f"sensor {name!r} ({drivers[name]}) does not implement agent.sensors.base.Sensor")
    return sensor


def load_sensors(names: list[str], agent_id: str) -> list[Sensor]:
    return [load_sensor(name, agent_id) for name in names]
