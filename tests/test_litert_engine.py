"""The device tier's .tflite must generate exactly what the torch model generates.

Tiny random models, exported once per module (the export dominates the run time).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from tests.conftest import tiny_decoder  # noqa: E402
from tierline.build.export_tflite import export_tflite  # noqa: E402
from tierline_cloud_node.engine import TorchEngine  # noqa: E402
from tierline_device_agent.engine import Interpreter, LiteRTEngine  # noqa: E402
from tierline_shared.models.llama import Decoder  # noqa: E402
from tierline_shared.models.tokenizer import TextTokenizer  # noqa: E402
from tierline_shared.runtime.engine import EngineError, EngineInfo, GenerationParams  # noqa: E402

TOK = TextTokenizer.default()
PROMPTS = ["7", "12+34=", "what is 5*6? answer:", "a longer prompt of thirty-five chars", "x" * 45]


def _torch_engine(model: Decoder) -> TorchEngine:
    c = model.cfg
    return TorchEngine(model, TOK, EngineInfo("device", "tierline", "0", model.num_params(), 0,
                                              c.context, c.window_limit))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Decoder, Path, dict]:
    model = tiny_decoder(0)
    path = tmp_path_factory.mktemp("device") / "model.tflite"
    report = export_tflite(model, path, prefill_lens=(32, 64))
    return model, path, report


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engines(exported) -> tuple[LiteRTEngine, TorchEngine]:
    model, path, _ = exported
    return LiteRTEngine.load(path, TOK), _torch_engine(model)


def _greedy(n: int, window: int = 0) -> GenerationParams:
    return GenerationParams(max_tokens=n, attention_window=window)


def test_greedy_matches_torch(engines):
    lite, ref = engines
    for p in PROMPTS:
        n = min(16, 64 - len(p))
        a, b = lite.generate(p, _greedy(n)), ref.generate(p, _greedy(n))
        assert a.token_ids == b.token_ids, p
        assert a.text == b.text
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


def test_logits_match_torch(engines):
    lite, ref = engines
    for p in PROMPTS:
        ids = np.array([TOK.encode(p)], dtype=np.int64)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        a, _ = lite._forward(ids, np.ones_like(ids), pos, None)
        b, _ = ref._forward(ids, np.ones_like(ids), pos, None)
        assert a.shape == b.shape == (1, 1, TOK.vocab_size)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sliding_window_matches_torch(engines):
    """A window narrower than the sequence evicts via kv_start; torch drops cache rows."""
    lite, ref = engines
    for p, window in [("12+34=", 4), ("what is 5*6? answer:", 7), ("x" * 45, 16)]:
        n = min(12, 64 - len(p))
        a, b = lite.generate(p, _greedy(n, window)), ref.generate(p, _greedy(n, window))
        assert a.token_ids == b.token_ids, (p, window)


def test_cached_equals_uncached(engines):
    lite, _ = engines
    for p in PROMPTS[:4]:
        n = min(20, 64 - len(p))
        assert lite.generate(p, _greedy(n)).text == lite.generate_uncached(p, n)


def test_prefill_in_chunks(engines):
    """A prompt longer than every prefill signature runs as several fixed-length calls."""
    lite, ref = engines
    lite_short = LiteRTEngine(lite._interpreter, lite.cfg, TOK, lite.info, lite.path)
    lite_short.prefill_lens = [32]  # pretend prefill_64 is missing: 45 tokens -> 32 + 13 (padded to 32)
    ids = np.array([TOK.encode("x" * 20 + "y" * 25)], dtype=np.int64)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    a, past = lite_short._forward(ids, np.ones_like(ids), pos, None)
    b, _ = ref._forward(ids, np.ones_like(ids), pos, None)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert past.length == ids.shape[1] > 32 and past.start == 0


def test_signatures_follow_litert_convention(exported):
    model, path, report = exported
    cfg = model.cfg
    sigs = Interpreter(model_path=str(path)).get_signature_list()
    assert set(sigs) == {"prefill_32", "prefill_64", "decode"}
    assert report["signatures"] == ["prefill_32", "prefill_64", "decode"]
    caches = {f"kv_cache_{kv}_{i}" for i in range(cfg.layers) for kv in "kv"}
    for name, sig in sigs.items():
        assert set(sig["inputs"]) == {"tokens", "input_pos", "kv_start"} | caches, name
        assert set(sig["outputs"]) == {"logits"} | caches, name
    runner = Interpreter(model_path=str(path)).get_signature_runner("prefill_32")
    details = runner.get_input_details()
    assert list(details["tokens"]["shape"]) == [1, 32] and details["tokens"]["dtype"] == np.int32
    assert list(details["input_pos"]["shape"]) == [32] and details["input_pos"]["dtype"] == np.int32
    shape = [1, cfg.context, cfg.kv_heads, cfg.head_dim]  # grouped-query attention: the KV heads only
    assert cfg.kv_heads < cfg.num_attention_heads
    assert list(details["kv_cache_k_0"]["shape"]) == shape and report["kv_cache"]["shape"] == shape


def test_engine_info(engines, exported):
    lite, _ = engines
    model, path, _ = exported
    assert lite.info.params == model.num_params() == model.cfg.num_params()
    assert lite.info.bytes == path.stat().st_size
    assert lite.info.max_context == 64 and lite.info.window_limit == 64
    with pytest.raises(EngineError, match="context"):
        lite.generate("x" * 60, _greedy(10))


def test_corrupt_file_names_the_path(exported, tmp_path):
    _, path, _ = exported
    shutil.copy(path.parent / "config.json", tmp_path / "config.json")
    for name, content in [("garbage.tflite", b"not a flatbuffer" * 8), ("empty.tflite", b""),
                          ("truncated.tflite", path.read_bytes()[:5000])]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=str(bad)):
            LiteRTEngine.load(bad, TOK)


def test_config_mismatch_names_the_file(exported, tmp_path):
    model, path, _ = exported
    shutil.copy(path, tmp_path / "model.tflite")
    model.cfg.replace(num_hidden_layers=3).write(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path / "model.tflite")):
        LiteRTEngine.load(tmp_path / "model.tflite", TOK)
    with pytest.raises(FileNotFoundError, match="config.json"):
        (tmp_path / "config.json").unlink()
        LiteRTEngine.load(tmp_path / "model.tflite", TOK)


def test_model_attention_window_matches_torch(tmp_path):
    """A config with its own sliding window (Mistral's): the window is baked into the graph's mask."""
    model = tiny_decoder(1, max_position_embeddings=32, sliding_window=8, architecture="MistralForCausalLM")
    export_tflite(model, tmp_path / "model.tflite", prefill_lens=(32,))
    lite, ref = LiteRTEngine.load(tmp_path / "model.tflite", TOK), _torch_engine(model)
    assert lite.info.window_limit == 8
    for p, window in [("12+34=", 0), ("what is 5*6? answer:", 0), ("what is 5*6? answer:", 5)]:
        a, b = lite.generate(p, _greedy(10, window)), ref.generate(p, _greedy(10, window))
        assert a.token_ids == b.token_ids, (p, window)
    assert lite.generate("what is 5*6?", _greedy(12)).text == lite.generate_uncached("what is 5*6?", 12)
