"""The LitAPIs of the peer: the edge tier's int8 ONNX engine behind LitServe's batching.

`EdgeLitAPI` is LitServe's dynamic batching (a batch formed, then decoded to its end);
`EdgeContinuousLitAPI` is its continuous batching (requests join and leave the running
batch at every step), the loop LitServe provides for decoders. A module of its own because
LitServe spawns its inference worker and pickles these classes by name; only the peer
process (`python -m tierline_bench.peer`) imports it.
"""

from __future__ import annotations

import asyncio
import functools
import threading

import litserve as ls
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

from tierline_edge_node.engine import load_engine
from tierline_shared.runtime.affinity import pin
from tierline_shared.runtime.engine import GenerationParams, GenerationResult
from tierline_shared.runtime.runner import Sequence


def _load(api):
    """The edge engine in LitServe's inference worker, which runs on `api.engine_cpus` when the bench gives
    some (as the edge tier's engine core does, tiers.edge.engine_cpus)."""
    if api.engine_cpus:
        pin(api.engine_cpus)
    return load_engine(api.models_dir, threads=api.threads)


def _result_json(r: GenerationResult) -> dict:
    return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens}


class EdgeLitAPI(ls.LitAPI):
    """Request JSON `{"prompt", "max_tokens"}` -> `{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`."""

    def __init__(self, models_dir: str, threads: int, engine_cpus=(), **kwargs):
        super().__init__(**kwargs)
        self.models_dir, self.threads, self.engine_cpus = models_dir, threads, list(engine_cpus)

    def setup(self, device):
        self.engine = _load(self)

    def decode_request(self, request):
        return str(request["prompt"]), int(request["max_tokens"])

    def predict(self, batch):
        # the same decoding loop as the edge tier, on the batch LitServe formed
        return self.engine.generate_batch([p for p, _ in batch], [GenerationParams(max_tokens=m) for _, m in batch])

    def unbatch(self, output):
        return list(output)

    def encode_response(self, r):
        return _result_json(r)


class WaitingContinuousLoop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, idle without spinning: LitServe calls `run` again at once
    when it finds nothing active, which holds a core at 100 % between requests (taken from whatever
    shares the machine); this `run` first awaits the next request."""

    @functools.cached_property
    def _arrived(self) -> asyncio.Event:  # made in the worker's event loop, never pickled
        return asyncio.Event()

    def add_request(self, uid, request, lit_api, lit_spec, transport=None) -> None:
        super().add_request(uid, request, lit_api, lit_spec, transport)
        self._arrived.set()

    async def run(self, lit_api, *args) -> None:
        if not lit_api.has_active_requests():
            await self._arrived.wait()
            self._arrived.clear()
        await super().run(lit_api, *args)


class EdgeContinuousLitAPI(ls.LitAPI):
    """The same engine under LitServe's ContinuousBatchingLoop, driving one `ModelRunner`: a request
    joins the running batch at the next runner step and leaves it when it finishes; `max_batch_size`
    is the number of concurrent sequences. More wait in LitServe's queue, and LitServe admits a waiting
    one only when another request arrives or a second passes without any: keep it at least the client
    concurrency.

    Request JSON `{"prompt", "max_tokens"}`. The loop requires LitServe's streaming, so the reply is a
    chunked 200 whose body is exactly one line, sent when the sequence finishes:
    `{"text", "finish_reason", "prompt_tokens", "completion_tokens"}` + "\\n", the same JSON as
    `EdgeLitAPI`'s (`json.loads(body)` reads both). No per-token deltas: nothing in the bench reads
    them, and each would be one more message from the worker per sequence and step. A request that
    fails (a field missing, too long for the model) gets a 200 with an empty body: LitServe ends a
    stream on an error without sending it, and logs only that one occurred.
    """

    def __init__(self, models_dir: str, threads: int, engine_cpus=(), **kwargs):
        super().__init__(stream=True, loop=WaitingContinuousLoop(), **kwargs)
        self.models_dir, self.threads, self.engine_cpus = models_dir, threads, list(engine_cpus)

    def setup(self, device):
        self.engine = _load(self)
        self.runner = self.engine.runner()
        self._lock = threading.Lock()  # add_request runs on the loop's event loop while step runs in a thread
        self._waiting: list[tuple[str, dict]] = []  # (uid, request) not yet in the runner
        self._running: dict[str, Sequence] = {}  # the step thread's own
        self._open = 0  # requests added and not yet answered: what capacity counts

    def add_request(self, uid: str, request: dict) -> None:
        with self._lock:
            self._waiting.append((uid, request))
            self._open += 1

    def has_active_requests(self) -> bool:
        return self._open > 0

    def has_capacity(self) -> bool:
        return self._open < self.max_batch_size

    def step(self, prev_outputs: list[Output] | None) -> list[Output]:
        """Runner steps until some request is answered (LitServe sleeps 10 ms after a step that answers
        none); requests added meanwhile join at the next runner step."""
        outputs: list[Output] = []
        while not outputs and self.has_active_requests():
            with self._lock:
                arrived, self._waiting = self._waiting, []
            with self.engine._lock:
                for uid, request in arrived:
                    try:
                        prompt, params = str(request["prompt"]), GenerationParams(max_tokens=int(request["max_tokens"]))
                        self.engine.check(prompt, params)
                    except (KeyError, TypeError, ValueError) as exc:  # EngineError is a ValueError
                        outputs.append(Output(uid, exc, LitAPIStatus.ERROR))
                        continue
                    self._running[uid] = self.runner.sequence(prompt, params)
                self.runner.step([(s, self.runner.chunk_limit(s)) for s in self._running.values() if not s.prefilled])
            for uid in [u for u, s in self._running.items() if s.done]:
                seq = self._running.pop(uid)
                if seq.error is not None:
                    outputs.append(Output(uid, seq.error, LitAPIStatus.ERROR))
                else:
                    # LitServe drops what comes with FINISH_STREAMING: the result goes first, as an OK item
                    outputs += [Output(uid, seq.result(), LitAPIStatus.OK),
                                Output(uid, "", LitAPIStatus.FINISH_STREAMING)]
            with self._lock:
                self._open -= len({o.uid for o in outputs})
        return outputs

    def encode_response(self, output):
        # the result becomes its JSON line; the end-of-stream marker and errors pass as LitServe expects them
        return _result_json(output) if isinstance(output, GenerationResult) else output
