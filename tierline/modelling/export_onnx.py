"""The edge artifact: the student as ONE ONNX decoder graph with a KV cache, then int8.

One graph serves both prefill (past length 0) and decode, with the Hugging Face /
optimum decoder names, so any optimum-style runtime can drive it:

    inputs   input_ids (B, T) int64, attention_mask (B, P+T) int64, position_ids (B, T) int64,
             past_key_values.{i}.key / .value (B, n_head, P, head_dim) float32
    outputs  logits (B, T, vocab) float32 (every position), present.{i}.key / .value (B, n_head, P+T, head_dim)

The graph is exported with attention_window=0 (plain causal attention over whatever
cache it is given): the engines trim the cache themselves for sliding windows.
The model config travels inside the file as metadata (`tierline.config`), so the graph
is self-describing even without the config.json the pipeline writes beside it.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from shared.model import GPT

DEFAULT_OPSET = 17  # LayerNormalization is a native op from opset 17
# Trace shapes: all different from each other and from every model dimension we know of,
# and not 0 or 1, so that the tracer cannot confuse or specialise them.
TRACE_BATCH = 2
TRACE_SEQ = 3
TRACE_PAST = 5
META_CONFIG = "tierline.config"  # metadata key: GPTConfig as JSON
META_PARAMS = "tierline.num_params"  # metadata key: parameter count of the torch model
# Int8: only the weight MatMuls/Gemms. Gather (the embeddings) stays fp32: quantizing it
# saves little (it is a lookup, no compute) and costs accuracy. Attention's activation x
# activation MatMuls (q @ k^T, p @ v) stay fp32 too: MatMulConstBOnly.
QUANT_OP_TYPES = ("MatMul", "Gemm")
QUANT_PER_CHANNEL = True  # one scale per output column: clearly closer to fp32 for small widths


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
    """GPT with the past as flat positional tensors, since ONNX export needs flat inputs."""

    def __init__(self, model: GPT):
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


def _dummy_inputs(model: GPT) -> tuple[torch.Tensor, ...]:
    """A left-padded batch with a non-empty past, so that no path is traced away."""
    cfg = model.cfg
    dev = next(model.parameters()).device
    B, T, P = TRACE_BATCH, TRACE_SEQ, TRACE_PAST
    input_ids = torch.randint(0, cfg.vocab_size, (B, T), dtype=torch.long, device=dev)
    attention_mask = torch.ones(B, P + T, dtype=torch.long, device=dev)
    attention_mask[0, :2] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
    past = [torch.randn(B, cfg.n_head, P, cfg.head_dim, device=dev) for _ in range(2 * cfg.n_layer)]
    return (input_ids, attention_mask, position_ids, *past)


def export_onnx(model: GPT, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Write `model` as one decoder graph (prefill and decode) to `path`, fp32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_layer = model.cfg.n_layer
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python ints
            torch.onnx.export(
                _FlatDecoder(model),
                _dummy_inputs(model),
                str(path),
                input_names=input_names(n_layer),
                output_names=output_names(n_layer),
                dynamic_axes=_dynamic_axes(n_layer),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter: no onnxscript needed, dynamic_axes honoured
            )
    finally:
        model.train(was_training)
    proto = onnx.load(str(path))
    _set_metadata(proto, {META_CONFIG: json.dumps(asdict(model.cfg)), META_PARAMS: str(model.num_params())})
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the weight MatMuls (QOperator: MatMulInteger / DynamicQuantizeLinear)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:  # metadata_props (the config) are carried over by quantize_dynamic
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


def _set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    kept = {p.key: p.value for p in proto.metadata_props}
    kept.update(meta)
    del proto.metadata_props[:]
    for k, v in kept.items():
        proto.metadata_props.add(key=k, value=v)


def op_counts(path: Path) -> dict[str, int]:
    """Op type -> count in a graph, to see what quantization actually touched."""
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
