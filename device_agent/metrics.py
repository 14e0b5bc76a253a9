"""A fleet member's own series (`tierline_device_*`), served on the device tier's /metrics beside its tier series.

What an operator alerts on for a board: it stopped beating (stale, as `tierline devices
list` says), its model updates fail, its telemetry piles up. The staleness rule is the
fleet view's own (tierline/devices.py): the last heartbeat older than `heartbeat_s` x
`stale_after_beats`; both sides of it are exported, so an alert needs no copy of the
board's settings.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from tierline_device_agent.ota import OtaCode

PREFIX = "tierline_device"


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry, device_id: str, stale_after_s: float,
                 outbox_pending: Callable[[], float], outbox_dropped: Callable[[], float],
                 link_up: Callable[[], bool]):
        d = ["device_id"]
        self.device_id = device_id
        self.heartbeat = Gauge(f"{PREFIX}_last_heartbeat_timestamp_seconds", "When the fleet registry last took "
                               "this board's heartbeat (Unix time; the agent's start until the first)", d,
                               registry=registry).labels(device_id)
        self.heartbeat.set(time.time())  # a board that never registers goes stale from its start
        Gauge(f"{PREFIX}_stale_after_seconds", "heartbeat_s x stale_after_beats: the board is stale once its last "
              "heartbeat is older", d, registry=registry).labels(device_id).set(stale_after_s)
        self.updates = Counter(f"{PREFIX}_ota_updates", "Model updates this board finished, by status: applied, or "
                               "why not (device_agent/ota.py OtaCode, lower case)", [*d, "status"], registry=registry)
        for code in OtaCode:  # every outcome at 0 from the start, so increase() sees the first failure
            if code != OtaCode.IN_PROGRESS:
                self.updates.labels(device_id, code.name.lower())
        Gauge(f"{PREFIX}_outbox_events", "Telemetry events in the outbox, not yet stored by JetStream", d,
              registry=registry).labels(device_id).set_function(outbox_pending)
        Gauge(f"{PREFIX}_outbox_dropped_events", "Telemetry events dropped, oldest first, because the outbox was "
              "full (since the outbox file was made)", d, registry=registry).labels(device_id).set_function(
            outbox_dropped)
        Gauge(f"{PREFIX}_tier_link_up", "1 while the board's NATS link to the tiers above is up", d,
              registry=registry).labels(device_id).set_function(lambda: float(link_up()))

    def beat(self) -> None:
        """The registry took a heartbeat."""
        self.heartbeat.set(time.time())

    def updated(self, code: OtaCode) -> None:
        """An update finished with `code`."""
        self.updates.labels(self.device_id, code.name.lower()).inc()
