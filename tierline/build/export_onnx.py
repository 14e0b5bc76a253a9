"""The edge artifact: a Llama-family decoder as ONE ONNX graph with a KV cache, then int8.

One graph serves both prefill (past length 0) and decode, with the Hugging Face /
optimum decoder names, so any optimum-style runtime can drive it:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) float32
    outputs  logits (B, T, vocab) float32 (every position), present.{i}.key / .value (B, kv_heads, P+T, head_dim)

kv_heads is the number of key/value heads (grouped-query attention stores fewer than the query heads);
rotary positions are computed in the graph from position_ids.

The graph is exported with attention_window=0 (plain causal attention over whatever
cache it is given): the engines trim the cache themselves for sliding windows.
The model config travels inside the file as metadata (`tierline.config`), so the graph
is self-describing even without the config.json the pipeline writes beside it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from tierline_edge_node.engine import META_CONFIG, META_PARAMS

DEFAULT_OPSET = 17  # the ONNX opset of the exported graphs
# Trace shapes: different from each other and not 0 or 1 (which the tracer could treat as
# broadcasts); sizes are traced as graph ops, and export_onnx checks other shapes after export.
TRACE_BATCH = 2
TRACE_SEQ = 7
TRACE_PAST = 11
VERIFY_RTOL = 1e-4  # ONNX vs torch logits after export, relative to the largest |logit|
# Int8: only the weight MatMuls/Gemms. Gather (the embeddings) stays fp32: quantizing it
# saves little (it is a lookup, no compute) and costs accuracy. Attention's activation x
# activation MatMuls (q @ k^T, p @ v) stay fp32 too: MatMulConstBOnly.
QUANT_OP_TYPES = ("MatMul", "Gemm")
# One weight scale per output column: a little closer to fp32 than one per tensor (mean |logit
# error| 0.0225 vs 0.0242, next-token agreement 99.2% vs 98.9% on a trained 3 x 96 student).
QUANT_PER_CHANNEL = True


def input_names(n_layer: int) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(n_layer):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(n_layer: int) -> list[str]:
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


class _FlatDecoder(nn.Module):
    """The decoder with the past as flat positional tensors, since ONNX export needs flat inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, past, attention_window=0)
        return (logits, *[t for kv in presents for t in kv])


def _dynamic_axes(n_layer: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    for i in range(n_layer):
        for kind in ("key", "value"):
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch", 2: "past_sequence"}
            axes[f"present.{i}.{kind}"] = {0: "batch", 2: "total_sequence"}
    return axes


def _dummy_inputs(model: nn.Module, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A left-padded batch with a non-empty past, so that no path is traced away."""
    cfg = model.cfg
    B, T, P = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    attention_mask = torch.ones(B, P + T, dtype=torch.long)
    attention_mask[0, :2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
    past = [torch.randn(B, cfg.kv_heads, P, cfg.head_dim, generator=gen) for _ in range(2 * cfg.layers)]
    return (input_ids, attention_mask, position_ids, *past)


def export_onnx(model: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write `model` as one decoder graph (prefill and decode) to `path`, fp32, and check it against torch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_layer = model.cfg.layers
    device = next(model.parameters()).device
    was_training = model.training
    gen = torch.Generator().manual_seed(0)  # a local generator: the caller's RNG stream is left alone
    model.cpu().eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python ints
            torch.onnx.export(
                _FlatDecoder(model),
                _dummy_inputs(model, gen),
                str(path),
                input_names=input_names(n_layer),
                output_names=output_names(n_layer),
                dynamic_axes=_dynamic_axes(n_layer),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic_axes honoured
            )
        proto = onnx.load(str(path))
        _set_metadata(proto, {META_CONFIG: json.dumps(model.cfg.to_hf()), META_PARAMS: str(model.num_params())})
        onnx.save(proto, str(path))
        onnx.checker.check_model(str(path))
        _verify(model, path, gen)
    finally:
        model.to(device).train(was_training)


@torch.no_grad()
def _verify(model: nn.Module, path: Path, gen: torch.Generator) -> None:
    """Run the graph on shapes other than the traced ones: prefill from an empty past, then decode.

    A size the tracer baked in as a constant shows up here rather than in production.
    """
    import numpy as np
    import onnxruntime as ort

    cfg = model.cfg
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    B, T = 3, 4
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past_np = [np.zeros((B, cfg.kv_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.layers)
    past_t = None
    for kind in ("prefill", "decode"):
        out = sess.run(None, dict(zip(input_names(cfg.layers), [ids.numpy(), mask.numpy(), pos.numpy(), *past_np])))
        ref, past_t = model(ids, mask, pos, past_t, attention_window=0)
        ref = ref.numpy()
        err = float(np.max(np.abs(out[0] - ref)))
        if err > VERIFY_RTOL * max(1.0, float(np.max(np.abs(ref)))):
            raise ValueError(f"{path}: exported graph disagrees with the torch model on {kind} (max |diff| {err:.2e})")
        past_np = out[1:]
        ids = torch.randint(0, cfg.vocab_size, (B, 1), generator=gen)
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
        pos = pos[:, -1:] + 1


def quantize_int8(src: Path, dst: Path, calib_ids: list[list[int]] | None = None) -> None:
    """int8 quantization of the weight MatMuls.

    With calibration sequences (token ids), activations get fixed (static) scales:
    every row is then computed exactly as it would be alone, so greedy text is the
    same with and without the KV cache and whatever the batch. Without them,
    dynamic quantization picks one activation scale per call, and a cached decode
    step (one row) can round differently from a full recompute (many rows): the
    onnxruntime #10322 class of bug.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:  # metadata_props (the config) are carried over by the quantizers
        if calib_ids:
            quantize_static(
                str(src),
                str(dst),
                _CalibReader(src, calib_ids),
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=list(QUANT_OP_TYPES),
                per_channel=QUANT_PER_CHANNEL,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
        else:
            quantize_dynamic(
                str(src),
                str(dst),
                op_types_to_quantize=list(QUANT_OP_TYPES),
                per_channel=QUANT_PER_CHANNEL,
                weight_type=QuantType.QInt8,
                extra_options={"MatMulConstBOnly": True},
            )
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{src}: could not be quantized to {dst} ({exc})") from exc


class _CalibReader:
    """Feeds whole sequences (prefill with an empty cache) to the static calibrator."""

    def __init__(self, src: Path, calib_ids: list[list[int]]):
        import onnxruntime as ort

        sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        past = {i.name: i.shape for i in sess.get_inputs() if i.name.startswith("past_key_values")}
        self._feeds = []
        for ids in calib_ids:
            T = len(ids)
            feed = {
                "input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, T), dtype=np.int64),
                "position_ids": np.arange(T, dtype=np.int64)[None],
            }
            for name, shape in past.items():
                feed[name] = np.zeros((1, shape[1], 0, shape[3]), dtype=np.float32)
            self._feeds.append(feed)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


def _set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    kept = {p.key: p.value for p in proto.metadata_props}
    kept.update(meta)
    del proto.metadata_props[:]
    for k, v in kept.items():
        proto.metadata_props.add(key=k, value=v)
