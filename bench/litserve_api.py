"""The LitAPI of the peer: the edge tier's int8 ONNX engine behind LitServe's batching.

A module of its own because LitServe spawns its inference worker and pickles this
class by name; only the peer process (`python -m bench.peer`) imports it.
"""

from __future__ import annotations

import litserve as ls

from tierline_edge_node.engine import load_engine
from tierline_shared.runtime.engine import GenerationParams


class EdgeLitAPI(ls.LitAPI):
    """Request JSON `{"prompt", "max_tokens"}` -> `{"text", "finish_reason", "prompt_tokens", "completion_tokens"}`."""

    def __init__(self, models_dir: str, threads: int, **kwargs):
        super().__init__(**kwargs)
        self.models_dir, self.threads = models_dir, threads

    def setup(self, device):
        self.engine = load_engine(self.models_dir, threads=self.threads)

    def decode_request(self, request):
        return str(request["prompt"]), int(request["max_tokens"])

    def predict(self, batch):
        # the same decoding loop as the edge tier, on the batch LitServe formed
        return self.engine.generate_batch([p for p, _ in batch], [GenerationParams(max_tokens=m) for _, m in batch])

    def unbatch(self, output):
        return list(output)

    def encode_response(self, r):
        return {"text": r.text, "finish_reason": r.finish_reason, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens}
