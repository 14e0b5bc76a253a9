"""The model definition: KV cache, padding and sliding-window attention are exact."""

import pytest
import torch

from tierline_shared.models.gpt import GPT, GPTConfig, build_mask, load_model, save_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=64, n_layer=2, n_head=2, head_dim=8, n_embd=16, ffn_hidden=32)
    return GPT(cfg).eval()


def test_kv_cache_matches_full_forward(model):
    ids = torch.randint(4, 50, (2, 12))
    full, _ = model(ids, torch.ones_like(ids))
    logits, past = model(ids[:, :7], torch.ones(2, 7, dtype=torch.long))
    steps = [logits]
    for t in range(7, 12):
        out, past = model(ids[:, t:t + 1], torch.ones(2, t + 1, dtype=torch.long),
                          torch.full((2, 1), t), past)
        steps.append(out)
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
    # with a window of 3 the last token cannot see the first tokens: changing them changes nothing
    changed = ids.clone()
    changed[0, :5] = 7
    a, _ = model(ids, torch.ones_like(ids), attention_window=3)
    b, _ = model(changed, torch.ones_like(ids), attention_window=3)
    # only the first layer sees positions >= 7 - window..., two layers reach 2*(3-1) back
    torch.testing.assert_close(a[0, -1], b[0, -1])
    full_a, _ = model(ids, torch.ones_like(ids))
    full_b, _ = model(changed, torch.ones_like(ids))
    assert not torch.allclose(full_a[0, -1], full_b[0, -1])


def test_config_validates():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_head=0)
    with pytest.raises(ValueError, match="attention_window"):
        GPTConfig(block_size=32, attention_window=64)


def test_save_and_load_round_trip(model, tmp_path):
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    ids = torch.randint(4, 50, (1, 5))
    torch.testing.assert_close(again(ids)[0], model(ids)[0])
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)
