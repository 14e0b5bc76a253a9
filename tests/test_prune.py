"""Structural pruning: the budget is met, shapes are real, and kept weights are copied exactly."""

from __future__ import annotations

import pytest
import torch

from tierline.build.prune import (
    build_pruned,
    prune,
    prune_ffn,
    prune_heads,
)
from tierline.build.train import TrainConfig, train
from tierline_shared.models.gpt import GPT, GPTConfig
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.tasks.problems import generate

TOK = TextTokenizer.default()
# block 128, levels 1-2 (<= 99 tokens): even level-1 problems exceed 64 tokens, and short
# rows keep the test fast
LEVELS = (1, 2)
CFG = GPTConfig(vocab_size=TOK.vocab_size, block_size=128, n_layer=3, n_head=4, head_dim=16,
                n_embd=64, ffn_hidden=256)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained() -> GPT:
    """Trained a little so activations, and so importances, are not random noise."""
    torch.manual_seed(0)
    model = GPT(CFG)
    # warm-up 5, not the default 50: 30 steps must actually reach the peak rate
    train(model, TOK, TrainConfig(steps=30, batch_size=16, warmup=5), levels=LEVELS)
    return model.eval()


@pytest.fixture(scope="module")
def calib():
    return generate("calib", 32, seed=0, levels=LEVELS)


@pytest.fixture(scope="module")
def pruned(trained, calib):
    return prune(trained, TOK, 0.35, calib)


def _ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, TOK.vocab_size, (2, 40), generator=g)


def test_param_count_matches_model():
    assert CFG.num_params() == GPT(CFG).num_params()


def test_prune_meets_ratio_and_shrinks(trained, pruned):
    new, report = pruned
    before = trained.num_params()
    assert new.num_params() <= 0.35 * before
    assert report["params_before"] == before and report["params_after"] == new.num_params()
    assert report["ratio"] <= 0.35
    c = new.cfg
    assert c.n_layer <= CFG.n_layer and c.n_head <= CFG.n_head and c.ffn_hidden <= CFG.ffn_hidden
    assert (c.n_layer, c.n_head, c.ffn_hidden) != (CFG.n_layer, CFG.n_head, CFG.ffn_hidden)
    # untouched: embeddings and widths
    assert (c.n_embd, c.vocab_size, c.block_size, c.head_dim) == (CFG.n_embd, CFG.vocab_size,
                                                                  CFG.block_size, CFG.head_dim)
    assert torch.equal(new.wte.weight, trained.wte.weight)
    assert torch.equal(new.lm_head.weight, trained.lm_head.weight)
    assert len(report["layers_kept"]) == c.n_layer
    assert all(len(h) == c.n_head for h in report["heads_kept"].values())
    assert all(len(ch) == c.ffn_hidden for ch in report["ffn_kept"].values())


def test_pruned_model_runs_and_state_dict_matches_config(pruned):
    new, _ = pruned
    fresh = GPT(new.cfg)
    fresh.load_state_dict(new.state_dict(), strict=True)
    for k, v in fresh.state_dict().items():
        assert new.state_dict()[k].shape == v.shape, k
    logits, _ = new(_ids())
    assert logits.shape == (2, 40, CFG.vocab_size) and torch.isfinite(logits).all()
    # the cached path (as the engines use it) works too
    logits2, present = new(_ids(), attention_mask=torch.ones(2, 40, dtype=torch.long))
    assert len(present) == new.cfg.n_layer and present[0][0].shape[1] == new.cfg.n_head
    assert torch.allclose(logits, logits2, atol=1e-5)


def test_original_model_is_untouched(trained, calib):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    prune(trained, TOK, 0.5, calib[:8])
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())


def test_ffn_channels_copied_exactly(trained):
    keep = [[c for c in range(CFG.ffn_hidden) if (c + j) % 4 != 0] for j in range(CFG.n_layer)]
    ref = GPT(CFG).double()
    ref.load_state_dict(trained.state_dict())
    small = prune_ffn(ref, keep)
    assert small.cfg.ffn_hidden == len(keep[0]) < CFG.ffn_hidden
    with torch.no_grad():  # zero the removed channels: gelu(0) = 0, they contribute nothing
        for j, block in enumerate(ref.blocks):
            gone = [c for c in range(CFG.ffn_hidden) if c not in keep[j]]
            block.mlp.fc.weight[gone] = 0
            block.mlp.fc.bias[gone] = 0
    assert torch.allclose(ref(_ids())[0], small(_ids())[0], rtol=0, atol=1e-10)


def test_heads_copied_exactly(trained):
    keep = [[0, 2], [1, 3], [2, 3]]  # different heads per layer
    ref = GPT(CFG).double()
    ref.load_state_dict(trained.state_dict())
    small = prune_heads(ref, keep)
    assert small.cfg.n_head == 2
    d = CFG.head_dim
    with torch.no_grad():  # mask removed heads: zero q/k/v, so a head's value (and output) is 0
        for j, block in enumerate(ref.blocks):
            for h in set(range(CFG.n_head)) - set(keep[j]):
                for lin in (block.attn.q, block.attn.k, block.attn.v):
                    lin.weight[h * d:(h + 1) * d] = 0
                    lin.bias[h * d:(h + 1) * d] = 0
    assert torch.allclose(ref(_ids())[0], small(_ids())[0], rtol=0, atol=1e-10)


def test_layer_heads_channels_together_copied_exactly(trained):
    layers, heads = [2, 0], [[1, 3], [0, 1]]
    chans = [list(range(0, 256, 2)), list(range(1, 256, 2))]
    small = build_pruned(trained, layers, heads, chans)
    assert (small.cfg.n_layer, small.cfg.n_head, small.cfg.ffn_hidden) == (2, 2, 128)
    assert torch.equal(small.blocks[0].attn.q.weight[16:32], trained.blocks[2].attn.q.weight[48:64])
    assert torch.equal(small.blocks[1].mlp.out.weight[:, 5], trained.blocks[0].mlp.out.weight[:, 11])


def test_keep_layers_is_honoured(trained, calib):
    new, report = prune(trained, TOK, 0.35, calib[:8], keep_layers=2)
    assert new.cfg.n_layer == 2 and len(report["layers_dropped"]) == 1
    assert new.num_params() <= 0.35 * trained.num_params()


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_bad_ratio_rejected(trained, calib, ratio):
    with pytest.raises(ValueError, match="target_ratio"):
        prune(trained, TOK, ratio, calib[:4])


def test_unreachable_ratio_explains_embeddings(trained, calib):
    with pytest.raises(ValueError, match="embeddings"):
        prune(trained, TOK, 0.05, calib[:4])


def test_empty_calibration_rejected(trained):
    with pytest.raises(ValueError, match="calib"):
        prune(trained, TOK, 0.35, [])


def test_build_pruned_rejects_non_uniform(trained):
    with pytest.raises(ValueError, match="as many heads"):
        build_pruned(trained, [0, 1], [[0], [0, 1]], [[0], [1]])
