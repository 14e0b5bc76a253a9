"""Structural pruning of the Llama-family decoder: the budget is met, shapes are real, kept weights are copied
exactly (a pruned model computes what the full one computes with the removed parts zeroed), and the result is a
checkpoint transformers loads."""

from __future__ import annotations

import pytest
import torch

from tierline.build.prune import build_pruned, prune, prune_groups, prune_mlp
from tierline.build.train import TrainConfig, train
from tierline_shared.models.configs import DecoderConfig
from tierline_shared.models.llama import Decoder, save_decoder
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.tasks.problems import generate

TOK = TextTokenizer.default()
# context 128, levels 1-2 (<= 99 tokens): short rows keep the test fast
LEVELS = (1, 2)
CFG = DecoderConfig(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                    eos_token_id=TOK.eos_id, bos_token_id=TOK.bos_id, pad_token_id=TOK.pad_id)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained() -> Decoder:
    """Trained a little so activations, and so importances, are not random noise."""
    torch.manual_seed(0)
    model = Decoder(CFG)
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


def _double(model: Decoder) -> Decoder:
    ref = Decoder(model.cfg).double()
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def test_param_count_matches_model():
    assert CFG.num_params() == Decoder(CFG).num_params()
    tied = CFG.replace(tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True)
    assert tied.num_params() == Decoder(tied).num_params()


def test_prune_meets_ratio_and_shrinks(trained, pruned):
    new, report = pruned
    before = trained.num_params()
    assert new.num_params() <= 0.35 * before
    assert report["params_before"] == before and report["params_after"] == new.num_params() <= 0.35 * before
    c = new.cfg
    assert (c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size) != (3, 2, 192)
    assert c.num_attention_heads // c.num_key_value_heads == 2  # the query heads go with their group
    assert (c.hidden_size, c.vocab_size, c.context, c.head_dim) == (64, CFG.vocab_size, 128, 16)
    assert torch.equal(new.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    assert torch.equal(new.lm_head.weight, trained.lm_head.weight)
    assert len(report["layers_kept"]) == c.num_hidden_layers
    assert all(len(g) == c.num_key_value_heads for g in report["groups_kept"].values())


def test_the_pruned_model_is_a_checkpoint_transformers_loads(pruned, tmp_path):
    transformers = pytest.importorskip("transformers")
    new, _ = pruned
    save_decoder(new, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(new(_ids())[0], back(input_ids=_ids()).logits, atol=1e-4, rtol=1e-4)


def test_original_model_is_untouched(trained, calib):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    prune(trained, TOK, 0.5, calib[:8])
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())


def test_mlp_channels_copied_exactly(trained):
    keep = [[c for c in range(192) if (c + j) % 4 != 0] for j in range(3)]
    ref = _double(trained)
    small = prune_mlp(ref, keep)
    assert small.cfg.intermediate_size == len(keep[0]) < 192
    with torch.no_grad():  # zero the removed channels: silu(0) * up = 0, they contribute nothing
        for j, layer in enumerate(ref.model.layers):
            layer.mlp.gate_proj.weight[[c for c in range(192) if c not in keep[j]]] = 0
    assert torch.allclose(ref(_ids())[0], small(_ids())[0], rtol=0, atol=1e-10)


def test_key_value_groups_copied_exactly(trained):
    keep = [[0], [1], [1]]  # different groups per layer
    ref = _double(trained)
    small = prune_groups(ref, keep)
    assert (small.cfg.num_key_value_heads, small.cfg.num_attention_heads) == (1, 2)
    d = CFG.head_dim
    with torch.no_grad():  # a removed group writes nothing: zero its query heads' columns of o_proj
        for j, layer in enumerate(ref.model.layers):
            for g in set(range(2)) - set(keep[j]):
                layer.self_attn.o_proj.weight[:, g * 2 * d:(g + 1) * 2 * d] = 0
    assert torch.allclose(ref(_ids())[0], small(_ids())[0], rtol=0, atol=1e-10)


def test_layers_groups_channels_together_copied_exactly(trained):
    small = build_pruned(trained, [2, 0], [[1], [0]], [list(range(0, 192, 2)), list(range(1, 192, 2))])
    c = small.cfg
    assert (c.num_hidden_layers, c.num_key_value_heads, c.num_attention_heads, c.intermediate_size) == (2, 1, 2, 96)
    d = CFG.head_dim
    old, new = trained.model.layers, small.model.layers
    assert torch.equal(new[0].self_attn.q_proj.weight, old[2].self_attn.q_proj.weight[2 * d:4 * d])
    assert torch.equal(new[0].self_attn.k_proj.weight, old[2].self_attn.k_proj.weight[d:2 * d])
    assert torch.equal(new[1].mlp.down_proj.weight[:, 5], old[0].mlp.down_proj.weight[:, 11])


def test_keep_layers_is_honoured(trained, calib):
    new, report = prune(trained, TOK, 0.35, calib[:8], keep_layers=2)
    assert new.cfg.num_hidden_layers == 2 and len(report["layers_dropped"]) == 1
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
    with pytest.raises(ValueError, match="as many groups"):
        build_pruned(trained, [0, 1], [[0], [0, 1]], [[0], [1]])
