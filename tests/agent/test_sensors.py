"""Sensor drivers: deterministic simulation, real /proc and /sys, entry-point discovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.sensors import Sensor, SensorError, available, load_sensor, load_sensors
from agent.sensors.linux import LinuxSensor
from agent.sensors.simulated import SimulatedSensor


def _values(sensor: Sensor, n: int) -> list[float]:
    return [s.value for _ in range(n) for s in sensor.read()]


def test_simulated_is_deterministic_per_agent() -> None:
    clock = iter(range(1000, 2000)).__next__
    a1, a2, b = SimulatedSensor("dev-a", clock=clock), SimulatedSensor("dev-a"), SimulatedSensor("dev-b")
    first = a1.read()[0]
    assert first.sensor == "sim_temp" and first.unit == "C" and first.sampled_at == 1000
    assert [first.value] + _values(a1, 9) == _values(a2, 10)
    assert _values(SimulatedSensor("dev-a"), 10) != _values(b, 10)
    assert all(15.0 < v < 35.0 for v in _values(b, 50))


def test_linux_reads_this_host() -> None:
    samples = LinuxSensor("dev-a").read()
    names = {s.sensor for s in samples}
    assert {"load1", "mem_available"} <= names
    mem = next(s for s in samples if s.sensor == "mem_available")
    assert mem.unit == "MiB" and mem.value > 0


def test_linux_reads_thermal_zones_from_a_root(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("47250\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/loadavg").write_text("0.42 0.30 0.20 1/100 1234\n")
    samples = {s.sensor: s for s in LinuxSensor("dev-a", root=tmp_path).read()}
    assert samples["thermal_zone0_temp"].value == 47.25 and samples["thermal_zone0_temp"].unit == "C"
    assert samples["load1"].value == 0.42
    assert "mem_available" not in samples


def test_linux_with_nothing_readable_raises(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match="no readable metrics"):
        LinuxSensor("dev-a", root=tmp_path).read()


def test_discovery_through_entry_points_and_builtins() -> None:
    drivers = available()
    assert drivers["simulated"] == "agent.sensors.simulated:SimulatedSensor"
    assert "linux" in drivers
    sensors = load_sensors(["simulated", "linux"], "dev-a")
    assert [type(s) for s in sensors] == [SimulatedSensor, LinuxSensor]
    with pytest.raises(AgentError, match="unknown sensor 'nope'"):
        load_sensor("nope", "dev-a")


def test_plugin_from_another_package_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party driver registers in the `edgeledger.sensors` entry-point group."""
    (tmp_path / "fake_edge_plugin.py").write_text(
        "from agent.sensors.base import Sample, Sensor\n"
        "class Fake(Sensor):\n"
        "    name = 'fake'\n"
        "    def read(self):\n"
        "        return [Sample('fake_level', 42.0, '%', 0.0)]\n"
    )
    dist = tmp_path / "fake_edge_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-edge-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[edgeledger.sensors]\nfake = fake_edge_plugin:Fake\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available()["fake"] == "fake_edge_plugin:Fake"
    sensor = load_sensor("fake", "dev-a")
    assert [s.value for s in sensor.read()] == [42.0]
