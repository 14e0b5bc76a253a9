"""The shared decoding loop, on the torch backend: batching, streaming, stops, windows."""

import numpy as np
import pytest
import torch

from tests.conftest import random_torch_engine
from tierline_shared.runtime.engine import EngineError, GenerationParams

PROMPTS = ["Q:1+2=?\nA:", "Q:max(3,9,4)=?\nA:", "Q:a=3;b=a+4;b=?\nA:"]


@pytest.fixture(scope="module")
def engine():
    return random_torch_engine(seed=1)


def test_batch_equals_one_by_one(engine):
    g = GenerationParams(max_tokens=12)
    batch = engine.generate_batch(PROMPTS, [g] * 3)
    for p, r in zip(PROMPTS, batch):
        one = engine.generate(p, g)
        assert r.text == one.text
        assert r.prompt_tokens == len(engine.tokenizer.encode(p))
        assert 0.0 < r.confidence <= 1.0


def test_cached_equals_uncached(engine):
    for p in PROMPTS:
        assert engine.generate(p, GenerationParams(max_tokens=15)).text == engine.generate_uncached(p, 15)


def test_stream_concatenates_to_the_text(engine):
    g = GenerationParams(max_tokens=10)
    assert "".join(engine.stream(PROMPTS[0], g)) == engine.generate(PROMPTS[0], g).text


def test_stop_string_cuts_and_reports_stop(engine):
    g = GenerationParams(max_tokens=12)
    # a random model may end early on EOS: cut a prompt whose answer runs to the limit
    prompt, full = next((p, r) for p in PROMPTS if (r := engine.generate(p, g)).finish_reason == "length")
    assert len(full.text) >= 4
    stop = full.text[2:4]
    cut = engine.generate(prompt, GenerationParams(max_tokens=12, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    streamed = "".join(engine.stream(prompt, GenerationParams(max_tokens=12, stop=(stop,))))
    assert streamed == cut.text


def test_sampling_is_seeded(engine):
    g = GenerationParams(max_tokens=10, temperature=1.5, top_p=0.9, seed=42)
    assert engine.generate(PROMPTS[0], g).text == engine.generate(PROMPTS[0], g).text


@pytest.mark.parametrize("window", [6, 2, 1])  # 1: each token sees itself only, the cache keeps nothing
def test_attention_window_equals_masked_reference(engine, window):
    """Evicting the cache must give exactly what the windowed full forward gives."""
    model, tok = engine.model, engine.tokenizer
    prompt, n = PROMPTS[2], 10  # prompt longer than the window: token-by-token prefill
    ids = tok.encode(prompt)
    out = []
    for _ in range(n):
        x = torch.tensor([ids + out])
        logits, _ = model(x, torch.ones_like(x), attention_window=window)
        out.append(int(logits[0, -1].argmax()))
    ref = tok.decode(out[: out.index(tok.eos_id)] if tok.eos_id in out else out)
    got = engine.generate(prompt, GenerationParams(max_tokens=n, attention_window=window)).text
    assert got == ref


def test_limits_are_enforced(engine):
    with pytest.raises(EngineError, match="attention_window 65 exceeds the model's limit 64"):
        engine.generate(PROMPTS[0], GenerationParams(max_tokens=4, attention_window=65))
    with pytest.raises(EngineError, match="maximum context length is 64 tokens"):
        engine.generate(PROMPTS[0], GenerationParams(max_tokens=60))
    with pytest.raises(ValueError, match="max_tokens"):
        GenerationParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationParams(temperature=-1)
    with pytest.raises(ValueError, match="temperature"):
        GenerationParams(temperature=float("nan"))


def test_mixed_windows_in_one_batch(engine):
    gs = [GenerationParams(max_tokens=8), GenerationParams(max_tokens=8, attention_window=5)]
    batch = engine.generate_batch(PROMPTS[:2], gs)
    assert [r.text for r in batch] == [engine.generate(p, g).text for p, g in zip(PROMPTS[:2], gs)]
    assert np.isfinite(batch[1].mean_logprob)


def test_cancelled_row_stops_and_the_others_go_on(engine):
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    g = GenerationParams(max_tokens=20)
    out = engine.generate_batch(PROMPTS[:2], [g, g], cancelled=[stop_after_three, lambda: False])
    # asked before each step: three steps ran, the first of which prefilled (a token) and decoded (another)
    assert out[0].finish_reason == "cancelled" and out[0].completion_tokens == 4
    assert out[1].text == engine.generate(PROMPTS[1], g).text


@pytest.mark.parametrize("stop", [(), ("zz",)])
def test_a_stream_never_sends_half_a_character(stop):
    """A byte-level BPE (Llama-3's and Qwen2's kind) splits a character's UTF-8 bytes across tokens: the decoding
    of the first part ends in U+FFFD until the next token completes it. The stream holds that back, so that its
    chunks add up to the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tierline_shared.models.tokenizer import TextTokenizer
    from tierline_shared.runtime.runner import Sequence

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello world."] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = TextTokenizer(bpe, {"eos_token": "<|endoftext|>"})
    text = "café 日本語 🙂 ok"
    ids = tok.encode(text, bos=False)
    assert len(ids) > len(text)  # characters split across tokens

    seq = Sequence([0], GenerationParams(max_tokens=100, stop=stop), 1000, {tok.eos_id}, tok.decode)
    chunks = []
    for t in ids:
        seq.push(t, 1.0)
        chunks.append(seq.take_text())
    seq.finish("length")
    chunks.append(seq.take_text())
    assert "".join(chunks) == seq.text == text and not any("\ufffd" in c for c in chunks)

    # a sequence that ends (max_tokens) inside a character: the stream says what the text says, U+FFFD included
    j = next(j for j in range(1, len(ids)) if tok.decode(ids[:j]).endswith("\ufffd"))
    cut = Sequence([0], GenerationParams(max_tokens=j, stop=stop), 1000, {tok.eos_id}, tok.decode)
    streamed = ""
    for t in ids[:j]:
        cut.push(t, 1.0)
        streamed += cut.take_text()
    assert cut.done and streamed == cut.text == tok.decode(ids[:j])
