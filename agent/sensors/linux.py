"""Linux host metrics from /sys and /proc: CPU temperature, load, free memory.

Why these: every Linux device has them without extra libraries, so a real agent
reports something true out of the box. Missing sources are skipped (containers
often have no thermal zones); a driver with nothing readable raises SensorError.
"""

from __future__ import annotations

import time
from pathlib import Path

from .base import Sample, Sensor, SensorError


class LinuxSensor(Sensor):
    name = "linux"

    def __init__(self, agent_id: str, root: Path = Path("/"), clock=time.time) -> None:
        super().__init__(agent_id)
        self.root = Path(root)
        self._clock = clock

    def _thermal(self) -> list[tuple[str, float, str]]:
        out = []
        base = self.root / "sys/class/thermal"
        for zone in sorted(base.glob("thermal_zone*")):
            try:
                millideg = int((zone / "temp").read_text().strip())
            except (OSError, ValueError):
                continue
            out.append((f"{zone.name}_temp", millideg / 1000.0, "C"))
        return out

    def _loadavg(self) -> list[tuple[str, float, str]]:
        try:
            first = (self.root / "proc/loadavg").read_text().split()[0]
            return [("load1", float(first), "load")]
        except (OSError, ValueError, IndexError):
            return []

    def _meminfo(self) -> list[tuple[str, float, str]]:
        try:
            lines = (self.root / "proc/meminfo").read_text().splitlines()
        except OSError:
            return []
        fields = {}
        for line in lines:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0])
        if "MemAvailable" in fields:
            return [("mem_available", fields["MemAvailable"] / 1024.0, "MiB")]
        return []

    def read(self) -> list[Sample]:
        now = self._clock()
        found = self._thermal() + self._loadavg() + self._meminfo()
        if not found:
            raise SensorError(f"no readable metrics under {self.root}/sys/class/thermal or {self.root}/proc")
        return [Sample(sensor=name, value=round(value, 3), unit=unit, sampled_at=now) for name, value, unit in found]
