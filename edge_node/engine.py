"""The edge backend: onnxruntime on CPU, running the one-graph decoder with a KV cache.

The graph has the optimum decoder names (see tierline/build/export_onnx.py), so
`_forward` is a single session.run; prefill passes empty (B, nh, 0, hd) past arrays.
The cache is plain numpy, and the sliding window is applied here, by trimming it;
`_past_take` / `_past_join` slice and left-pad it for the base engine's prefix cache.
No torch here: the edge node needs only onnxruntime and numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tierline_shared.models.artifacts import TierFiles, load_with
from tierline_shared.models.configs import CONFIG_FILE, DecoderConfig, config_from_dict, read_config
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import Engine, EngineInfo, Past, check_vocab

META_CONFIG = "tierline.config"  # the config embedded by export_onnx (fallback)
META_PARAMS = "tierline.num_params"  # the torch model's parameter count, embedded by export_onnx
_QUANT_PARAM_SUFFIXES = ("_scale", "_zero_point")  # quantization bookkeeping, not weights


class OnnxEngine(Engine):
    """One InferenceSession for prefill and decode; the KV cache lives in numpy between steps."""

    supports_prefix_cache = True
    supports_draft = True

    def __init__(self, session: ort.InferenceSession, tokenizer: TextTokenizer, info: EngineInfo, cfg: DecoderConfig):
        super().__init__(tokenizer, info, cfg.eos_token_ids)  # the checkpoint's end tokens stop it too
        self.session = session
        self.cfg = cfg
        n = cfg.layers
        self._past_names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(n)]
        self._out_names = ["logits"] + [f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")]

    @classmethod
    def load(cls, path: str | Path, tokenizer: TextTokenizer, tier: str = "edge", model_name: str = "tierline",
             version: str = "0", threads: int | None = None) -> "OnnxEngine":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such ONNX model")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own (non-ValueError) types for bad files
            raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc
        meta = session.get_modelmeta().custom_metadata_map
        cfg = _load_config(path, meta)
        _check_graph(session, cfg, path)
        check_vocab(cfg.vocab_size, tokenizer, path)
        params = int(meta[META_PARAMS]) if meta.get(META_PARAMS, "").isdigit() else _initializer_params(path)
        info = EngineInfo(tier, model_name, version, params, path.stat().st_size, cfg.context, cfg.window_limit)
        return cls(session, tokenizer, info, cfg)

    def _forward(self, input_ids, attention_mask, position_ids, past, last: int = 1):
        feed = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64),
                "position_ids": np.asarray(position_ids, np.int64)}  # the graph takes int64 only
        if past is None:
            empty = np.zeros((input_ids.shape[0], self.cfg.kv_heads, 0, self.cfg.head_dim), dtype=np.float32)
            past = [(empty, empty)] * self.cfg.layers
        for (kn, vn), (k, v) in zip(self._past_names, past):
            feed[kn], feed[vn] = k, v
        out = self.session.run(self._out_names, feed)
        present = [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.cfg.layers)]
        return out[0][:, -last:, :], present  # the graph's logits are every position's

    def _trim_past(self, past: Past, keep: int) -> Past:
        # copies, always: onnxruntime would copy a strided view on every step anyway, and a slice that is
        # contiguous already (one row, one KV head) would otherwise stay a view of the array it was cut from
        n = past[0][0].shape[2] - keep  # keep 0: none (a [-0:] slice would keep them all)
        return [(k[:, :, n:].copy(), v[:, :, n:].copy()) for k, v in past]

    def _past_take(self, past: Past, row: int, cols) -> Past:
        # copies, always (ascontiguousarray returns a contiguous view as it is: a whole row is one): a view would
        # keep the whole batch's cache alive in the prefix cache, and see the row's next owner written over it;
        # an index array's columns are a new array already
        own = np.copy if isinstance(cols, slice) else np.ascontiguousarray
        return [(own(k[row:row + 1, :, cols]), own(v[row:row + 1, :, cols])) for k, v in past]

    def _past_join(self, parts, width: int) -> Past:
        def stack(arrays) -> np.ndarray:
            a0 = arrays[0][0]
            n = sum(a.shape[0] if rows is None else len(rows) for a, rows, _ in arrays)
            out = np.empty((n, a0.shape[1], width, a0.shape[3]), dtype=a0.dtype)
            b = 0
            for a, rows, start in arrays:  # right-aligned: the left is padding (zeros), masked out
                w = a.shape[2] - start
                k = a.shape[0] if rows is None else len(rows)
                out[b:b + k, :, :width - w] = 0
                if rows is None:
                    out[b:b + k, :, width - w:] = a[:, :, start:]
                else:  # row by row: no intermediate copy of the whole batch
                    for j, r in enumerate(rows):
                        out[b + j, :, width - w:] = a[r, :, start:]
                b += k
            return out

        return [(stack([(p[i][0], rows, start) for p, rows, start in parts]),
                 stack([(p[i][1], rows, start) for p, rows, start in parts])) for i in range(len(parts[0][0]))]

    def _past_rows(self, past: Past, rows: np.ndarray, start: int) -> Past:
        return [(np.ascontiguousarray(k[rows, :, start:]), np.ascontiguousarray(v[rows, :, start:])) for k, v in past]


def _load_config(path: Path, meta: dict[str, str]) -> DecoderConfig:
    """config.json beside the model (the pipeline's contract), else the config embedded at export."""
    cfg_path = path.parent / CONFIG_FILE
    if cfg_path.is_file():
        try:
            return read_config(cfg_path)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            raise ValueError(msg if msg.startswith(str(cfg_path)) else f"{cfg_path}: not a valid model config "
                                                                       f"({exc})") from exc
    if META_CONFIG in meta:
        try:
            return config_from_dict(json.loads(meta[META_CONFIG]), f"{path} (embedded config)")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: embedded config is invalid ({exc})") from exc
    raise ValueError(f"{path}: no {CONFIG_FILE} beside it and no embedded config")


def _check_graph(session: ort.InferenceSession, cfg: DecoderConfig, path: Path) -> None:
    """The graph's inputs must be the decoder the config describes (a stale config.json shows here)."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    n_past = sum(1 for name in inputs if name.startswith("past_key_values."))
    problems = []
    for name in ("input_ids", "attention_mask", "position_ids"):
        if name not in inputs:
            problems.append(f"no input {name!r}")
    if "logits" not in outputs:
        problems.append("no output 'logits'")
    if n_past != 2 * cfg.layers:
        problems.append(f"{n_past} past inputs, config says {cfg.layers} layers")
    for name, shape in inputs.items():
        if name.startswith("past_key_values.") and len(shape) == 4:
            if shape[1] != cfg.kv_heads or shape[3] != cfg.head_dim:
                problems.append(f"{name} has shape {shape}, config says (B, {cfg.kv_heads}, P, {cfg.head_dim})")
                break
    vocab = outputs.get("logits", [None, None, None])[-1]
    if isinstance(vocab, int) and vocab != cfg.vocab_size:
        problems.append(f"logits over {vocab} tokens, config says {cfg.vocab_size}")
    if problems:
        raise ValueError(f"{path}: graph does not match its config: " + "; ".join(problems))


def _initializer_params(path: Path) -> int:
    """Weight elements in the graph's initializers (used when the export metadata is missing)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return sum(
        int(np.prod(t.dims)) for t in graph.initializer
        if len(t.dims) >= 1 and not t.name.endswith(_QUANT_PARAM_SUFFIXES)
    )


FORMATS = ("onnx",)  # fp32 or int8 (the models index says "onnx-int8")


def load_engine(models_dir: str | Path, tier: str = "edge", threads: int | None = None) -> OnnxEngine:
    """The edge model of a models directory, every file sha256-checked first (ArtifactError otherwise)."""
    def backend(f: TierFiles) -> OnnxEngine:
        return OnnxEngine.load(f.weights, f.tokenizer, f.tier, f.model_name, f.version, threads=threads)

    return load_with(models_dir, tier, FORMATS, backend)
