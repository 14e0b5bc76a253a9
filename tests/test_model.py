"""The model definition (shared/models/llama.py) on its own: KV cache, padding and sliding-window attention are
exact, its files round-trip, and config.json files it does not serve are refused naming the file."""

import json
import re

import pytest
import torch

from tests.conftest import tiny_decoder
from tierline_shared.models.configs import DecoderConfig, read_config
from tierline_shared.models.llama import build_mask, load_decoder, save_decoder

# config.json as the project wrote it before its family moved to the Llama format
PRE_LLAMA_CONFIG = {"vocab_size": 249, "block_size": 256, "n_layer": 4, "n_head": 4, "head_dim": 32, "n_embd": 128,
                    "ffn_hidden": 512, "attention_window": 0, "dropout": 0.0}


@pytest.fixture(scope="module")
def model():
    return tiny_decoder(0, vocab_size=50)


def test_kv_cache_matches_full_forward(model):
    ids = torch.randint(4, 50, (2, 12))
    full, _ = model(ids, torch.ones_like(ids))
    logits, past = model(ids[:, :7], torch.ones(2, 7, dtype=torch.long))
    steps = [logits]
    for t in range(7, 12):
        out, past = model(ids[:, t:t + 1], torch.ones(2, t + 1, dtype=torch.long),
                          torch.full((2, 1), t), past)
        steps.append(out)
    assert past[0][0].shape == (2, model.cfg.kv_heads, 12, model.cfg.head_dim)  # the KV heads only are cached
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_left_padding_does_not_change_a_row(model):
    ids = torch.randint(4, 50, (1, 6))
    alone, _ = model(ids, torch.ones_like(ids))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out, _ = model(padded, mask, pos)
    torch.testing.assert_close(out[:, 3:], alone, atol=1e-5, rtol=1e-4)


def test_training_path_equals_masked_path(model):
    ids = torch.randint(4, 50, (3, 10))
    fused, _ = model(ids)
    masked, _ = model(ids, torch.ones_like(ids))
    torch.testing.assert_close(fused, masked, atol=1e-5, rtol=1e-4)


def test_sliding_window_limits_attention(model):
    mask = build_mask(torch.ones(1, 6, dtype=torch.long), 6, window=2)[0, 0]
    assert mask[5].tolist() == [False, False, False, False, True, True]
    ids = torch.randint(4, 50, (1, 10))
    # with a window of 3 and two layers the last token reaches 2 * (3 - 1) = 4 positions back: changing the
    # first five tokens changes nothing for it, and does without the window
    changed = ids.clone()
    changed[0, :5] = 7
    a, _ = model(ids, torch.ones_like(ids), attention_window=3)
    b, _ = model(changed, torch.ones_like(ids), attention_window=3)
    torch.testing.assert_close(a[0, -1], b[0, -1])
    full_a, _ = model(ids, torch.ones_like(ids))
    full_b, _ = model(changed, torch.ones_like(ids))
    assert not torch.allclose(full_a[0, -1], full_b[0, -1])
    # the config's own window (Mistral's sliding_window) is the same mask
    windowed = tiny_decoder(0, vocab_size=50, sliding_window=3, architecture="MistralForCausalLM")
    torch.testing.assert_close(windowed(ids, torch.ones_like(ids))[0], a)


def test_config_validates():
    base = tiny_decoder(0, vocab_size=50).cfg
    with pytest.raises(ValueError, match="head_dim"):
        base.replace(head_dim=0)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        base.replace(num_key_value_heads=3)
    with pytest.raises(ValueError, match="sliding_window"):
        base.replace(sliding_window=65)
    with pytest.raises(ValueError, match="architectures"):
        base.replace(architecture="GPT2LMHeadModel")


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tied, tmp_path):
    model = tiny_decoder(1, vocab_size=50, tie_word_embeddings=tied)
    save_decoder(model, tmp_path)
    again = load_decoder(tmp_path)
    assert again.cfg == model.cfg and again.num_params() == model.num_params()
    ids = torch.randint(4, 50, (1, 5))
    torch.testing.assert_close(again(ids)[0], model(ids)[0])
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_decoder(tmp_path)


def test_a_pre_llama_config_is_refused_naming_the_file(tmp_path):
    """The project's own config.json from before the Llama format: every reader says what it is and what to do."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PRE_LLAMA_CONFIG))
    for read in (lambda: read_config(path), lambda: DecoderConfig.read(tmp_path), lambda: load_decoder(tmp_path)):
        with pytest.raises(ValueError, match=re.escape(str(path)) + ": the old pre-Llama config format.*"
                                             "tierline models build"):
            read()
