"""Reading Prometheus text in tests: exact sample values, not substring matches.

Why: "name{label} 1" is a substring of "name{label} 10.0"; tests compare parsed values.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a whole exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample, or None when the exposition does not have it."""
    return samples(text).get((name, tuple(sorted(labels.items()))))
