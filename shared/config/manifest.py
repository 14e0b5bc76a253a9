"""The YAML tier manifest: one schema that configures every Tierline process.

`load_manifest(path)` reads the file into the dataclasses below and checks it
whole before anything starts: an unknown key, a wrong type, a value out of range,
a missing artifact or a sha256 that does not match gives one `ManifestError`
naming the file and the field (`tiers.edge.batching.max_queue: ...`); the
processes print it and exit 2. The schema is documented in docs/MANIFEST.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tierline_shared.models.artifacts import sha256_of
from tierline_shared.wire import PRIORITIES, TIERS

EXIT_BAD_MANIFEST = 2


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the field."""


@dataclass
class NatsConfig:
    # the NATS server (or a leaf node near the tier); several of one cluster separated by commas
    url: str = "nats://127.0.0.1:4222"
    user: str = ""  # user/password authentication: one login for every process, no permissions (docs/SECURITY.md)
    password: str = ""
    # a directory of NATS identities (`tierline creds init`): each process connects as its own role with the
    # seed `<identity>.nk` found there, and the server enforces that role's permissions; replaces user/password
    credentials: str = ""
    tls_ca: str = ""  # the CA certificate (PEM) that signed the server's: clients verify the server (tls:// url)
    connect_timeout_ms: int = 2000  # per connection attempt
    request_timeout_ms: int = 10000  # one request to a tier over NATS


ACCELERATORS = ("cpu", "cuda", "auto")  # tiers.<tier>.accelerator


@dataclass
class BatchConfig:
    """The tier's iteration-level scheduler (shared/runtime/scheduler.py), with vLLM's names."""

    max_num_seqs: int = 16  # sequences in the running batch at most (1 turns batching off)
    # tokens one step computes at most: one per running sequence + prompt chunks (a prompt completing in the step
    # also decodes its first token in it: one more per such sequence)
    max_num_batched_tokens: int = 2048
    max_queue: int = 64  # requests waiting, beyond which new ones are refused (RESOURCE_EXHAUSTED)
    # seconds an engine core in its own process may hold requests without finishing a step (vLLM's
    # VLLM_ENGINE_ITERATION_TIMEOUT_S): past it, it is taken for hung, killed, and started again; what it held
    # fails UNAVAILABLE (shared/runtime/engine_core.py). Longer than the slowest step the model takes
    iteration_timeout_s: float = 60.0

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not 0 < self.iteration_timeout_s < float("inf"):
            raise ValueError(f"iteration_timeout_s must be > 0 seconds, got {self.iteration_timeout_s}")


@dataclass
class UpstreamConfig:
    """An OpenAI-compatible server the tier forwards to instead of running a model (cloud_node/upstream.py)."""

    url: str = ""  # its base URL, e.g. http://vllm:8000/v1 ("" = the tier runs its own model)
    model: str = ""  # the model name it serves (vLLM's --served-model-name); "" = the manifest's model_name
    retries: int = 1  # more attempts after a connection error or a 5xx, within the request's deadline
    api_key_env: str = ""  # an environment variable holding its bearer token ("" = none)
    # its model's context (prompt + completion tokens), which Tierline cannot ask it: 0 = unknown (the upstream
    # alone bounds max_tokens); set, a max_tokens that leaves no room is refused before the upstream is asked
    max_context: int = 0


@dataclass
class TierConfig:
    artifact: str = ""  # weights, relative to models_dir (the manifest in models_dir lists the rest); required
    sha256: str = ""  # of the weights; checked at start; required (both, unless the tier forwards: upstream)
    grpc_host: str = "127.0.0.1"  # loopback: only this machine; any other address needs grpc_token_file
    grpc_port: int = 0  # 0 = any free port (reported at start)
    # a file holding the bearer token every InferenceService call must send (`authorization: Bearer <token>`);
    # required when grpc_host is not a loopback address (the router, with its API keys, is the public door)
    grpc_token_file: str = ""
    metrics_port: int = 0  # Prometheus /metrics; 0 = any free port, -1 = off
    threads: int = 2  # runtime threads
    timeout_ms: int = 10000  # a request's deadline inside the tier when the caller sets none
    # stopping (SIGTERM: an upgrade, a scale down), the tier takes no new request and lets those in flight finish
    # for this long (Triton's --exit-timeout-secs); what is still running then ends UNAVAILABLE. 0: at once
    stop_grace_s: float = 10.0
    cost_per_1k_tokens: float = 1.0  # relative cost, for cost reports
    cache_size: int = 1024  # LRU result cache for identical greedy requests (0 = off)
    # prompt tokens whose KV the engine keeps for prefix reuse (0 = off; the device's LiteRT engine has none)
    prefix_cache_tokens: int = 4096
    prefix_cache_min_match: int = 16  # shortest shared prefix (tokens) worth reusing
    # where the model runs: "cpu"; "cuda" or "auto" (CUDA when there is one) where the tier's backend can
    accelerator: str = "cpu"
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)  # the cloud only: forward, run no model
    # listed so the router here can ask it, but served by another host (whose manifest runs it): no artifact needed
    elsewhere: bool = False
    batching: BatchConfig = field(default_factory=BatchConfig)
    # the scheduler and the model in a process of their own (shared/runtime/engine_core.py: vLLM V1's engine
    # core), apart from the threads that serve requests; false: in the tier's process. The device agent, whose
    # updates swap its model in place, always runs it in its own process.
    engine_process: bool = True
    # CPUs the engine core runs on, its model's threads included (vLLM's CPU thread binding); the tier's own
    # process then keeps the machine's other CPUs. [] = the OS places both (the default)
    engine_cpus: list[int] = field(default_factory=list)

    def __post_init__(self):
        if len(set(self.engine_cpus)) != len(self.engine_cpus):
            raise ValueError(f"engine_cpus: {self.engine_cpus} names a CPU twice")
        if self.engine_cpus and not self.engine_process:
            raise ValueError("engine_cpus: engine_process is false: no engine core to bind")
        if 0 < len(self.engine_cpus) < self.threads:  # onnxruntime's and torch's threads spin, waiting for work
            raise ValueError(f"engine_cpus: {len(self.engine_cpus)} CPU(s) for threads: {self.threads} runtime "
                             "threads; name as many CPUs as threads, or set fewer threads")


@dataclass
class LimitsConfig:
    """What one request may ask for; with these bounds no request can exceed a NATS message (1 MiB)."""

    max_prompt_chars: int = 2000  # longer prompts get INVALID_ARGUMENT
    # largest max_tokens accepted; 0 = no cap of its own: the model's context less the prompt bounds it
    max_tokens: int = 0
    default_max_tokens: int = 96  # when a request sets none (less when the prompt leaves less room)
    max_n: int = 8  # choices per request at most (OpenAI's `n`; the router asks for each)
    max_stop: int = 4  # stop strings per request (as OpenAI's API)
    max_stop_chars: int = 64  # characters per stop string
    max_id_chars: int = 128  # request_id and model name


@dataclass
class BatchApiConfig:
    """The OpenAI Batch API (router/batch.py): files and batches kept in JetStream, run by every router's workers."""

    enabled: bool = True  # needs JetStream on the NATS server; without it the batch endpoints answer 503
    workers: int = 8  # lines one router runs at once, at the lowest priority (interactive requests go first)
    max_attempts: int = 3  # runs of one line a tier failure (5xx) may take before its error goes to the error file
    ack_wait_s: float = 30.0  # a worker silent this long on a line is taken for dead: another router runs it
    max_file_mb: int = 100  # largest file upload
    # the files one API key may keep (what it uploaded and has not deleted); an upload past it is refused
    max_stored_mb: int = 1024
    max_lines: int = 50_000  # lines per batch


@dataclass
class RouterConfig:
    enabled: bool = True  # this host runs a router (`tierline up --host`: one host's share of a deployment)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    metrics_port: int = 0
    # escalate when the answering tier's confidence is below its threshold
    confidence_threshold: dict[str, float] = field(default_factory=lambda: {"device": 0.5, "edge": 0.5})
    # prompts scored at or above this complexity go straight to the cloud
    cloud_complexity: float = 0.8
    # prompts scored below this may be answered by the device
    device_complexity: float = 0.2
    retries_per_tier: int = 1  # another replica before escalating
    # how long a request waits, at most, for a tier with no replica up (one restarting, or reconnecting after
    # the NATS node it was on died) when no other tier answered; 0 = UNAVAILABLE at once (router/cascade.py)
    no_replica_wait_ms: int = 3000
    # the learned scorer (relative to models_dir); "" = the step-counting heuristic
    scorer: str = ""
    # the OpenAI-compatible HTTP endpoint (/v1/completions ...); 0 = any free port, -1 = off
    http_port: int = 0
    # a connection that sends no whole request head this long after it opened (or after its last answer) is closed,
    # and a body that stops coming for this long is a 408 (slow and stalled clients: slowloris)
    http_read_timeout_ms: int = 30_000
    # HTTP connections open at once; past it a new one is answered 503 and closed (the process's files, its gRPC
    # door and its NATS link stay free)
    http_max_connections: int = 1024
    batch: BatchApiConfig = field(default_factory=BatchApiConfig)  # /v1/files and /v1/batches on that endpoint




@dataclass
class PlanConfig:
    calls_per_day: int  # requests admitted per key and UTC day
    tokens_per_day: int  # prompt + completion tokens per key and UTC day
    priority: str = "normal"  # in the tiers' batch queues: low, normal or high

    def __post_init__(self):
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority: must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")


def _default_plans() -> dict[str, PlanConfig]:
    return {"free": PlanConfig(calls_per_day=100, tokens_per_day=20_000, priority="normal"),
            "pro": PlanConfig(calls_per_day=100_000, tokens_per_day=20_000_000, priority="high")}


@dataclass
class AuthConfig:
    # every router request needs `authorization: Bearer <key>`; false only for local development
    enabled: bool = True
    # where keys and daily usage live: "sqlite" (the file `key_store`: the routers of one host) or "nats"
    # (JetStream KV on the manifest's NATS, compare-and-set: every router of a deployment counts exactly)
    store: str = "sqlite"
    key_store: str = "keys.sqlite"  # SQLite file of hashed keys and daily usage, relative to this file
    plans: dict[str, PlanConfig] = field(default_factory=_default_plans)  # plan name -> quotas


DEVICE_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")  # valid in a KV key


@dataclass
class DeviceAgentConfig:
    """The device agent as a fleet member (device_agent/fleet.py); threads come from tiers.device.threads."""

    device_id: str = ""  # this board's id in the fleet ("" = no fleet: serve only); letters, digits, _ and -
    heartbeat_s: float = 30.0  # seconds between heartbeats (backing off up to 8x while NATS is away)
    stale_after_beats: int = 3  # the fleet view marks a device stale after this many missed beats
    state_dir: str = "device-state"  # relative to the manifest: installed model versions and the outbox
    outbox_max_events: int = 10000  # telemetry kept while offline; beyond, the oldest are dropped (counted)
    memory_max_mb: int = 0  # the agent's memory cap (private writable memory, RLIMIT_DATA, MiB); 0 = none
    health_problems: int = 16  # benchmark problems a new model is checked on before it takes traffic
    # share of their reference answers' tokens it must predict (teacher-forced), else the update is rolled back
    health_min_token_accuracy: float = 0.25
    # the publishers' Ed25519 public keys ("ed25519:<base64>", `tierline creds init` prints the operator's):
    # an update is installed only when one of them signed it; a list, so keys can rotate
    update_keys: list[str] = field(default_factory=list)

    def __post_init__(self):
        from tierline_shared.security.signing import parse_public_key

        for i, key in enumerate(self.update_keys):
            try:
                parse_public_key(key)
            except ValueError as exc:
                raise ValueError(f"update_keys[{i}]: {exc}") from None
        if self.device_id and not set(self.device_id) <= DEVICE_ID_CHARS:
            raise ValueError(f"device_id: {self.device_id!r} may hold only letters, digits, '_' and '-'")
        if len(self.device_id) > 64:
            raise ValueError(f"device_id: {len(self.device_id)} characters, at most 64")


@dataclass
class Manifest:
    path: Path  # the manifest file itself (for relative paths and messages)
    model_name: str
    models_dir: str  # relative to the manifest file
    tiers: dict[str, TierConfig]
    nats: NatsConfig = field(default_factory=NatsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    device_agent: DeviceAgentConfig = field(default_factory=DeviceAgentConfig)
    version: int = 1

    @property
    def models_path(self) -> Path:
        return (self.path.parent / self.models_dir).resolve()

    def resolve(self, relative: str) -> Path:
        """A path the manifest names, relative to the manifest's own directory."""
        return (self.path.parent / relative).resolve()

    @property
    def key_store_path(self) -> Path:
        return (self.path.parent / self.auth.key_store).resolve()

    def costs(self) -> dict[str, float]:
        """Tier -> cost_per_1k_tokens, for the tiers this manifest configures (what cost reports charge)."""
        return {name: tier.cost_per_1k_tokens for name, tier in self.tiers.items()}

    def tier(self, name: str) -> TierConfig:
        if name not in self.tiers:
            raise ManifestError(f"{self.path}: tiers.{name}: not configured (have {', '.join(self.tiers)})")
        return self.tiers[name]


KEY_STORES = ("sqlite", "nats")  # auth.store
_CHOICES = {"accelerator": ACCELERATORS, "store": KEY_STORES}  # field -> its allowed values
DAY_MS = 86_400_000  # a timeout longer than a day is a typo (1e13 ms overflowed a deadline: INTERNAL on every call)
_RANGES = {  # field -> (min, max) inclusive, None = unbounded
    "grpc_port": (0, 65535), "metrics_port": (-1, 65535), "threads": (1, 256), "timeout_ms": (1, DAY_MS),
    "cost_per_1k_tokens": (0, None), "cache_size": (0, None), "max_prompt_chars": (1, 100_000),
    "prefix_cache_tokens": (0, 10_000_000), "prefix_cache_min_match": (1, 100_000),
    "max_tokens": (0, None), "default_max_tokens": (1, None), "max_n": (1, 128), "connect_timeout_ms": (1, DAY_MS),
    "request_timeout_ms": (1, DAY_MS), "cloud_complexity": (0, 1), "device_complexity": (0, 1),
    "retries_per_tier": (0, 10), "retries": (0, 10), "no_replica_wait_ms": (0, 600_000), "max_num_seqs": (1, 1024),
    "max_num_batched_tokens": (1, 1_000_000), "max_context": (0, 10_000_000),
    "max_queue": (1, 100000), "iteration_timeout_s": (1, 86400), "stop_grace_s": (0, 3600), "version": (1, 1),
    "http_port": (-1, 65535), "http_read_timeout_ms": (1, 3_600_000), "http_max_connections": (1, 1_000_000),
    "calls_per_day": (1, None), "tokens_per_day": (1, None),
    "max_stop": (0, 16), "max_stop_chars": (1, 1024), "max_id_chars": (1, 1024),
    "heartbeat_s": (0.05, 86400), "stale_after_beats": (1, 1000), "outbox_max_events": (1, 10_000_000),
    "memory_max_mb": (0, 1_048_576), "workers": (1, 1024), "max_attempts": (1, 100), "ack_wait_s": (1, 3600),
    "max_file_mb": (1, 4096), "max_stored_mb": (1, 10_000_000), "max_lines": (1, 10_000_000),
    "health_problems": (1, 1000), "health_min_token_accuracy": (0, 1), "engine_cpus": (0, 4095),
}



def field_range(field: str) -> tuple[float | None, float | None]:
    """The inclusive (min, max) a manifest allows a field (None: unbounded), for what reads a value a manifest set
    elsewhere (the fleet view checks a board's reported heartbeat settings against it)."""
    return _RANGES[field]

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def _check_model_name(manifest: Manifest) -> None:
    """The served name by the one rule the importer and the boards apply (shared/models/names.py), and within this
    manifest's own request limit: a name a request's `model` field cannot carry is refused here, not on every
    request."""
    from tierline_shared.models.names import ModelNameError, check_model_name  # names.py reads LimitsConfig

    name, limit = manifest.model_name, manifest.limits.max_id_chars
    try:
        check_model_name(name)
    except ModelNameError as exc:
        raise ManifestError(f"{manifest.path}: model_name: {name!r} {exc}") from None
    if len(name) > limit:
        raise ManifestError(f"{manifest.path}: model_name: {name!r} is {len(name)} characters; limits.max_id_chars "
                            f"({limit}) refuses every request that names it")


class DuplicateKey(yaml.YAMLError):
    """A YAML mapping names a key twice (`_UniqueKeys`)."""


class _UniqueKeys(yaml.SafeLoader):
    """YAML as PyYAML's safe loader reads it, but a key given twice in one mapping is an error: YAML says keys are
    unique, and PyYAML keeps the last silently (a second `router:` section dropped the first, unseen)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges; an explicit key may override those
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise DuplicateKey(f"line {key_node.start_mark.line + 1}: {key}: given twice in one mapping (the "
                                       "second would silently replace the first)")
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_manifest(path: str | Path, check_artifacts: bool = True) -> Manifest:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as exc:  # a directory, no permission, not text
        raise ManifestError(f"{path}: cannot read the manifest ({getattr(exc, 'strerror', None) or exc})") from None
    except DuplicateKey as exc:
        raise ManifestError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    manifest = _build(Manifest, {**raw, "path": path}, path, "")
    _check_model_name(manifest)
    bad = set(manifest.tiers) - set(TIERS)
    if bad:
        raise ManifestError(f"{path}: tiers.{sorted(bad)[0]}: unknown tier; allowed: {', '.join(TIERS)}")
    for name, t in manifest.router.confidence_threshold.items():
        if name not in TIERS or not 0 <= t <= 1:
            raise ManifestError(f"{path}: router.confidence_threshold.{name}: must be a tier name -> value in [0, 1]")
        if name == TIERS[-1]:
            raise ManifestError(f"{path}: router.confidence_threshold.{name}: the top tier's answers are always kept "
                                f"(nothing above it to escalate to): give device and edge only")
    # a tier the map leaves out keeps its default (a map of the edge's alone left the device's at 0: never escalate)
    manifest.router.confidence_threshold = {**RouterConfig().confidence_threshold,
                                            **manifest.router.confidence_threshold}
    if manifest.auth.enabled and not manifest.auth.plans:
        raise ManifestError(f"{path}: auth.plans: at least one plan is needed when auth.enabled is true")
    if manifest.auth.enabled and manifest.auth.store == "sqlite" and not manifest.auth.key_store:
        raise ManifestError(f"{path}: auth.key_store: must name a file when auth.enabled is true")
    for name, tier in manifest.tiers.items():
        if not is_loopback(tier.grpc_host) and not tier.grpc_token_file:
            raise ManifestError(f"{path}: tiers.{name}.grpc_host: {tier.grpc_host} exposes the tier beyond this "
                                f"machine; set tiers.{name}.grpc_token_file (every call then needs "
                                "`authorization: Bearer <token>`), or bind 127.0.0.1")
    if manifest.nats.credentials and manifest.nats.user:
        raise ManifestError(f"{path}: nats.user: not with nats.credentials (each process connects as its own "
                            "identity from that directory)")
    if 0 < manifest.limits.max_tokens < manifest.limits.default_max_tokens:
        raise ManifestError(f"{path}: limits.default_max_tokens: must be <= limits.max_tokens "
                            f"({manifest.limits.max_tokens})")
    for name, tier in manifest.tiers.items():
        if tier.upstream.url and name != "cloud":
            raise ManifestError(f"{path}: tiers.{name}.upstream: only the cloud tier forwards to a serving engine")
        if tier.upstream.max_context and not tier.upstream.url:
            raise ManifestError(f"{path}: tiers.{name}.upstream.max_context: no upstream.url to forward to")
        if 0 < tier.upstream.max_context <= manifest.limits.default_max_tokens:  # its prompt is not counted here
            raise ManifestError(f"{path}: tiers.{name}.upstream.max_context: {tier.upstream.max_context} leaves "
                                f"no room for a prompt beside limits.default_max_tokens "
                                f"({manifest.limits.default_max_tokens}); must be greater")
        if tier.engine_cpus and (tier.upstream.url or tier.elsewhere):
            raise ManifestError(f"{path}: tiers.{name}.engine_cpus: this host runs no model for the {name} tier "
                                f"(tiers.{name}.{'upstream' if tier.upstream.url else 'elsewhere'})")
        for f in ("artifact", "sha256"):
            if not (tier.upstream.url or tier.elsewhere) and not getattr(tier, f):
                raise ManifestError(f"{path}: tiers.{name}.{f}: required field missing (or tiers.{name}.upstream)")
    if check_artifacts:
        for name, tier in manifest.tiers.items():
            if tier.upstream.url or tier.elsewhere:
                continue  # no local model
            artifact = manifest.models_path / tier.artifact
            if not artifact.is_file():
                raise ManifestError(f"{path}: tiers.{name}.artifact: file not found: {artifact}")
            actual = sha256_of(artifact)
            if actual != tier.sha256:
                raise ManifestError(f"{path}: tiers.{name}.sha256: {artifact} has sha256 {actual}, "
                                    f"the manifest says {tier.sha256}")
    return manifest


def _build(cls, data: Any, path: Path, where: str):
    """A dataclass from a YAML mapping, checking keys, types and ranges as it goes."""
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: {where or 'top level'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise ManifestError(f"{path}: {where}{key}: unknown key; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{where}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(f"{path}: {dotted}: required field missing")
            continue
        kwargs[name] = _convert(hints[name], data[name], path, dotted)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ManifestError(f"{path}: {where.rstrip('.') or 'top level'}: {exc}") from None


def _convert(hint, value, path: Path, dotted: str):
    origin = typing.get_origin(hint)
    if hint is Path:
        return Path(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, dotted + ".")
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: {dotted}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(val_t, v, path, f"{dotted}.{k}") for k, v in value.items()}
    if origin is list:
        (item_t,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ManifestError(f"{path}: {dotted}: expected a list, got {type(value).__name__}")
        return [_convert(item_t, v, path, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str), bool: isinstance(value, bool)}.get(hint, True)
    if not ok:
        raise ManifestError(f"{path}: {dotted}: expected {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):  # NaN passes every comparison: a range cannot catch it
        raise ManifestError(f"{path}: {dotted}: {value!r}; expected a finite number")
    leaf = dotted.rsplit(".", 1)[-1].split("[", 1)[0]  # a list's items: the list's rules
    if leaf in _CHOICES and value not in _CHOICES[leaf]:
        raise ManifestError(f"{path}: {dotted}: {value!r}; allowed: {', '.join(_CHOICES[leaf])}")
    if leaf in _RANGES:
        lo, hi = _RANGES[leaf]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ManifestError(f"{path}: {dotted}: {value!r} out of range [{lo}, {'inf' if hi is None else hi}]")
    return float(value) if hint is float else value
