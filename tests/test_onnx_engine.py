"""The edge backend reproduces the torch model: same logits, same greedy text, a sound KV cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import tiny_decoder
from tierline.build.export_onnx import export_onnx, input_names, output_names, quantize_int8
from tierline_cloud_node.engine import TorchEngine
from tierline_edge_node.engine import OnnxEngine
from tierline_shared.models.llama import Decoder
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import EngineInfo, GenerationParams

WEIGHT_STD = 0.3  # random weights well away from init scale: peaked, varied logits, few near-ties
ATOL = 1e-4  # fp32 ONNX vs torch logits
PROMPTS = ["12+7=", "What is 3*4?", "a", "x=5; y=x+2; y?", "Compare 17 and 71."]
MAX_TOKENS = 12  # completion tokens per prompt in the generation tests


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.default()


@pytest.fixture(scope="module")
def model() -> Decoder:
    m = tiny_decoder(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, WEIGHT_STD)
    return m.eval()


@pytest.fixture(scope="module")
def onnx_dir(model: Decoder, tok: TextTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("edge")
    export_onnx(model, d / "model.fp32.onnx")
    # static activation scales, as the pipeline ships: dynamic ones differ between a cached step and a recompute
    calib_ids = [tok.encode(p) for p in PROMPTS]
    quantize_int8(d / "model.fp32.onnx", d / "model.int8.onnx", calib_ids=calib_ids)
    model.cfg.write(d)
    return d


@pytest.fixture(scope="module")
def torch_engine(model: Decoder, tok: TextTokenizer) -> TorchEngine:
    info = EngineInfo("cloud", "t", "0", model.num_params(), 0, model.cfg.context, model.cfg.window_limit)
    return TorchEngine(model, tok, info)


@pytest.fixture(scope="module")
def fp32(onnx_dir: Path, tok: TextTokenizer) -> OnnxEngine:
    return OnnxEngine.load(onnx_dir / "model.fp32.onnx", tok, threads=1)


@pytest.fixture(scope="module")
def int8(onnx_dir: Path, tok: TextTokenizer) -> OnnxEngine:
    return OnnxEngine.load(onnx_dir / "model.int8.onnx", tok, threads=1)


def _left_padded(tok: TextTokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = [tok.encode(p) for p in prompts]
    L = max(len(x) for x in ids)
    input_ids = np.full((len(ids), L), tok.pad_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for b, x in enumerate(ids):
        input_ids[b, L - len(x):], mask[b, L - len(x):] = x, 1
    return input_ids, mask, np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def test_graph_has_the_optimum_decoder_names(fp32: OnnxEngine, model: Decoder) -> None:
    n = model.cfg.layers
    assert [i.name for i in fp32.session.get_inputs()] == input_names(n)
    assert [o.name for o in fp32.session.get_outputs()] == output_names(n)
    assert fp32.info.params == model.num_params()
    assert fp32.info.max_context == model.cfg.context


def test_fp32_logits_match_torch_prefill_and_decode(fp32: OnnxEngine, model: Decoder, tok: TextTokenizer) -> None:
    ids, mask, pos = _left_padded(tok, PROMPTS[:3])
    B, T = ids.shape
    kv, hd = model.cfg.kv_heads, model.cfg.head_dim
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(model.cfg.layers):  # prefill: past of length 0
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = np.zeros((B, kv, 0, hd), np.float32)
    out = fp32.session.run(None, feed)
    with torch.no_grad():
        ref, past = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), None,
                          attention_window=0)
    assert out[0].shape == (B, T, model.cfg.vocab_size)
    np.testing.assert_allclose(out[0], ref.numpy(), atol=ATOL)
    np.testing.assert_allclose(out[1], past[0][0].numpy(), atol=ATOL)

    nxt = np.array([[5], [6], [7]], dtype=np.int64)  # one decode step on the cache
    mask2 = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
    pos2 = pos[:, -1:] + 1
    feed = {"input_ids": nxt, "attention_mask": mask2, "position_ids": pos2}
    for i in range(model.cfg.layers):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = out[1 + 2 * i], out[2 + 2 * i]
    out2 = fp32.session.run(None, feed)
    with torch.no_grad():
        ref2, _ = model(torch.from_numpy(nxt), torch.from_numpy(mask2), torch.from_numpy(pos2), past,
                        attention_window=0)
    np.testing.assert_allclose(out2[0], ref2.numpy(), atol=ATOL)
    assert out2[1].shape == (B, kv, T + 1, hd)


def test_fp32_greedy_batch_matches_torch(fp32: OnnxEngine, torch_engine: TorchEngine) -> None:
    params = [GenerationParams(max_tokens=MAX_TOKENS)] * len(PROMPTS)
    got = fp32.generate_batch(PROMPTS, params)
    want = torch_engine.generate_batch(PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert any(len(set(r.token_ids)) > 1 for r in want)  # not a degenerate one-token model


@pytest.mark.parametrize("window", [6, 1])
def test_fp32_sliding_window_matches_torch(fp32: OnnxEngine, torch_engine: TorchEngine, window: int) -> None:
    """A prompt longer than the window is fed token by token with the cache trimmed (to nothing, for a window of 1)."""
    params = [GenerationParams(max_tokens=MAX_TOKENS, attention_window=window)] * 2
    prompts = ["x=5; y=x+2; y?", "12+7="]
    got = fp32.generate_batch(prompts, params)
    want = torch_engine.generate_batch(prompts, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_a_trimmed_cache_never_shares_memory_with_the_one_it_was_cut_from(int8: OnnxEngine) -> None:
    """Also when the slice is contiguous already (one row, one KV head): a view would see its source written
    over (the trap of a prefix-cache entry overwritten by the row that took its slot)."""
    for rows, heads in ((1, 1), (2, 2)):
        past = [(np.ones((rows, heads, 8, 4), np.float32), np.ones((rows, heads, 8, 4), np.float32))]
        trimmed = int8._trim_past(past, 5)
        assert trimmed[0][0].shape == (rows, heads, 5, 4)
        assert not any(np.shares_memory(t, p) for (t, _), (p, _) in zip(trimmed, past))


def test_int8_cached_matches_uncached(int8: OnnxEngine) -> None:
    for prompt in PROMPTS:
        cached = int8.generate(prompt, GenerationParams(max_tokens=MAX_TOKENS)).text
        assert cached == int8.generate_uncached(prompt, max_tokens=MAX_TOKENS), prompt


def test_int8_quantized_the_weight_matmuls(onnx_dir: Path, tmp_path: Path) -> None:
    import onnx

    fp32_size = (onnx_dir / "model.fp32.onnx").stat().st_size
    assert (onnx_dir / "model.int8.onnx").stat().st_size < fp32_size
    ops = [n.op_type for n in onnx.load(str(onnx_dir / "model.int8.onnx")).graph.node]
    assert "QLinearMatMul" in ops and "Gather" in ops  # static: weights and activations int8, embeddings fp32
    quantize_int8(onnx_dir / "model.fp32.onnx", tmp_path / "dynamic.onnx")  # no calibration: dynamic scales
    ops = [n.op_type for n in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node]
    assert "MatMulInteger" in ops and "Gather" in ops


def test_corrupt_file_raises_value_error_naming_it(onnx_dir: Path, tmp_path: Path, tok: TextTokenizer) -> None:
    bad = tmp_path / "model.int8.onnx"
    bad.write_bytes((onnx_dir / "model.int8.onnx").read_bytes()[:2000])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        OnnxEngine.load(bad, tok)
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        OnnxEngine.load(bad, tok)
    with pytest.raises(FileNotFoundError):
        OnnxEngine.load(tmp_path / "missing.onnx", tok)


def test_config_mismatch_and_vocab_mismatch(onnx_dir: Path, tmp_path: Path, model: Decoder, tok: TextTokenizer) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes((onnx_dir / "model.fp32.onnx").read_bytes())
    assert OnnxEngine.load(path, tok).info.params == model.num_params()  # no config.json: the embedded one
    model.cfg.replace(num_hidden_layers=3).write(tmp_path)
    with pytest.raises(ValueError, match="3 layers"):
        OnnxEngine.load(path, tok)
    model.cfg.write(tmp_path)
    other = TextTokenizer.default()
    other.vocab_size += 1
    with pytest.raises(ValueError, match="vocabulary"):
        OnnxEngine.load(path, other)
