"""What the property tests measured: the largest deviation from each reference, and how many
examples had their rankings asserted or were left out as undecided (printed with ``pytest -s``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeviationLog:
    """Per-name maxima of deviations and counts of asserted / left-out examples."""

    reference: str
    counted: str
    deviations: dict[str, float] = field(default_factory=dict)
    asserted: dict[str, int] = field(default_factory=dict)
    undecided: dict[str, int] = field(default_factory=dict)

    def record(self, name: str, deviation: float) -> None:
        self.deviations[name] = max(self.deviations.get(name, 0.0), float(deviation))

    def checked(self, name: str, asserted: bool = True) -> bool:
        """Count an example as asserted or left out; returns ``asserted`` for use in an ``if``."""
        counts = self.asserted if asserted else self.undecided
        counts[name] = counts.get(name, 0) + 1
        return asserted

    def lines(self) -> list[str]:
        out = [f"largest deviation from {self.reference}, by workload:"]
        out += [f"  {name:<28} {dev:.3e}" for name, dev in sorted(self.deviations.items())]
        out.append(f"{self.counted} asserted (left out), by name:")
        for name in sorted(set(self.asserted) | set(self.undecided)):
            out.append(f"  {name:<28} {self.asserted.get(name, 0)} ({self.undecided.get(name, 0)})")
        return out
