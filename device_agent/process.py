"""The device tier as a process: the board's model, its front door, and its fleet agent when it has an id.

A board that boots without NATS still serves its apps (the NATS service keeps connecting in
the background); with `device_agent.device_id` set the agent is also a fleet member
(fleet.py): registration, heartbeats, model updates, telemetry.
"""

from __future__ import annotations

import logging
import sqlite3

from tierline_device_agent.agent import DeviceAgentServicer
from tierline_device_agent.engine import LiteRTEngine
from tierline_device_agent.fleet import FleetAgent, load_device_model
from tierline_router.policy import Policy
from tierline_shared.config.manifest import ManifestError
from tierline_shared.security.identities import device_identity
from tierline_shared.serving.metrics import Metrics
from tierline_shared.serving.process import TierProcess, run
from tierline_shared.transport.tier_service import TierService

log = logging.getLogger("tierline.device")


class DeviceProcess(TierProcess):
    tier = "device"
    fleet: FleetAgent | None = None
    engine_process = False  # an update swaps the model in place (agent.py: swap_engine): it runs here
    fell_back: dict | None = None  # the installed model was damaged: the outcome the fleet agent reports

    def load_engine(self) -> LiteRTEngine:
        self.check_accelerator()  # its own loader, not engine_loader's: the check is here too
        try:  # the router's policy, its learned scorer included: the board decides as the router does
            self.policy = Policy.of_manifest(self.manifest)
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        # the memory cap; the model an update installed last, or the newest sound one
        engine, self.fell_back = load_device_model(self.manifest, threads=self.config.threads)
        return engine

    def make_servicer(self, engine: LiteRTEngine, metrics: Metrics, scheduler=None) -> DeviceAgentServicer:
        m = self.manifest
        return DeviceAgentServicer(*self.servicer_args(engine, metrics), policy=self.policy,
                                   upstream_timeout_s=m.nats.request_timeout_ms / 1000,
                                   retries_per_tier=m.router.retries_per_tier)

    def nats_identity(self) -> str:
        """A fleet member connects as its own board (`device-<id>`); a device tier without an id as the tier."""
        board = self.manifest.device_agent.device_id
        return device_identity(board) if board else super().nats_identity()

    def nats_retry_forever(self) -> bool:
        return bool(self.manifest.device_agent.device_id)  # a fleet member that boots offline still serves

    def started(self, servicer: DeviceAgentServicer, nats_service: TierService | None) -> dict:
        servicer.link = nats_service
        if self.manifest.device_agent.device_id and nats_service is not None:
            try:
                self.fleet = FleetAgent(self.manifest, servicer, threads=self.config.threads,
                                        fell_back=self.fell_back).start()
            except (OSError, sqlite3.Error):  # its state dir unusable (a damaged outbox is replaced, not this)
                log.exception("the fleet agent did not start; the board serves its apps without it")
        return {"device_id": self.fleet.device_id if self.fleet else None}

    def stopping(self) -> None:
        if self.fleet:
            self.fleet.stop()


def main(argv: list[str] | None = None) -> int:
    return run(DeviceProcess, argv)
