"""Names taken from the wire contract's enums (proto/tierline_api/v1): the tiers in order, the priorities.

Every table of tier or priority names in Tierline is this one, so a tier added to the proto's
`Tier` enum appears everywhere at once. Imports nothing but the generated code: the SDK uses it too.
"""

from __future__ import annotations

from tierline_api.v1 import inference_pb2 as pb


def _names(enum, prefix: str) -> dict[str, int]:
    """{"device": 1, ...}: the enum's values but UNSPECIFIED, by lower-case name without the prefix."""
    return {name.removeprefix(prefix).lower(): value for name, value in sorted(enum.items(), key=lambda kv: kv[1])
            if value != 0}


TIER_VALUES = _names(pb.Tier, "TIER_")
TIERS: tuple[str, ...] = tuple(TIER_VALUES)  # cheapest first: ("device", "edge", "cloud")
TOP_TIER = TIERS[-1]  # nothing above it: its answer is always kept
PRIORITY_VALUES = _names(pb.Priority, "PRIORITY_")  # {"low": 1, "normal": 2, "high": 3}
PRIORITIES: tuple[str, ...] = tuple(PRIORITY_VALUES)  # lowest first


def tiers_above(tier: str, available: tuple[str, ...] = TIERS) -> tuple[str, ...]:
    """The available tiers above `tier`, nearest first."""
    return tuple(t for t in TIERS[TIERS.index(tier) + 1:] if t in available)


def tiers_below(tier: str, available: tuple[str, ...] = TIERS) -> tuple[str, ...]:
    """The available tiers below `tier`, nearest first."""
    return tuple(t for t in reversed(TIERS[:TIERS.index(tier)]) if t in available)
