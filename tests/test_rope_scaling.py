"""Rope scaling (Llama 3.1/3.2's `llama3`, `linear`): our decoder against transformers' own forward.

Tiny random LlamaForCausalLM checkpoints with each scaling, saved by save_pretrained, load with load_decoder
and give transformers' logits and greedy tokens over positions well past the original context, where the
scaled frequencies differ from the unscaled ones. The types not implemented stay refused, naming the field.
"""

from __future__ import annotations

import json

import pytest
import torch

from tierline_shared.models.configs import ConfigError, DecoderConfig
from tierline_shared.models.llama import load_decoder, rope_frequencies, save_decoder

transformers = pytest.importorskip("transformers")
VOCAB = 97
PROMPT = 150  # tokens before greedy decoding starts: well past ORIGINAL
STEPS = 48
ORIGINAL = 64  # llama3's original_max_position_embeddings: wavelengths 16..64 are smoothed, longer ones scaled
# head_dim 12, theta 1e4: wavelengths 6, 29, 135, 628, 2916, 13535 positions: one kept, one smoothed, four scaled
SCALINGS = {
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
}


def hf_model(kind: str):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                      max_position_embeddings=256, rope_parameters=dict(SCALINGS[kind]),
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(11)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=sorted(SCALINGS))
def pair(request, tmp_path_factory):
    """(transformers' model, ours loaded from its save_pretrained files)."""
    ref = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(directory, safe_serialization=True)
    return ref, load_decoder(directory)


def test_the_scaled_frequencies_are_transformers(pair):
    ref, ours = pair
    assert ours.cfg.rope_type == ref.config.rope_parameters["rope_type"]
    want = ref.model.rotary_emb.inv_freq
    got = rope_frequencies(ours.cfg)
    assert torch.equal(got, want), (got, want)
    unscaled = rope_frequencies(ours.cfg.replace(rope_type="default"))
    assert not torch.equal(got, unscaled)  # the scaling changes something at these sizes


def test_logits_over_a_long_sequence_and_a_kv_cache_match_transformers(pair):
    ref, ours = pair
    ids = torch.randint(3, VOCAB, (2, 200), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding on the second row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:1])[0], ref(input_ids=ids[:1]).logits, atol=1e-5, rtol=1e-5)
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        first, past = ours(ids[:, :120], mask[:, :120], positions[:, :120])
        second, _ = ours(ids[:, 120:], mask, positions[:, 120:], past)
    torch.testing.assert_close(torch.cat([first, second], dim=1)[real], want[real], atol=1e-5, rtol=1e-5)


def test_greedy_tokens_past_the_original_context_match_transformers_generate(pair):
    ref, ours = pair
    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        want = out[0, PROMPT:].tolist()
        got, mask, step, past = [], torch.ones_like(ids), ids, None
        for _ in range(STEPS):
            positions = torch.arange(mask.shape[1] - step.shape[1], mask.shape[1])[None]
            logits, past = ours(step, mask, positions, past)
            step = logits[:, -1:].argmax(-1)
            got.append(step.item())
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    assert got == want, (got[:10], want[:10])


def test_the_scaling_survives_our_files_and_transformers_reads_them(pair, tmp_path):
    ref, ours = pair
    assert DecoderConfig.from_hf(ours.cfg.to_hf()) == ours.cfg
    save_decoder(ours, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"] == ref.config.rope_parameters
    assert DecoderConfig.read(tmp_path) == ours.cfg
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert torch.equal(back.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)


def test_older_files_with_rope_scaling_are_read_as_transformers_reads_them():
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 12, "max_position_embeddings": 256,
            "rope_theta": 500000.0}
    cfg = DecoderConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2}})
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 2.0, 500000.0)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    cfg = DecoderConfig.from_hf({**base, "rope_scaling": llama3})  # no original context: the model's, as there
    assert cfg.rope_original_max_position_embeddings == 256


@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope", "su"])
def test_scalings_not_implemented_are_refused_naming_the_field(field, kind):
    base = {**hf_model("linear").config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    base.pop("rope_scaling", None)
    data = {**base, field: {"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0}}
    with pytest.raises(ConfigError, match=rf"config.json: {field}.rope_type: '{kind}' rope scaling is not"):
        DecoderConfig.from_hf(data, "config.json")


def test_a_llama3_scaling_without_its_factors_is_refused_naming_the_field():
    data = {**hf_model("llama3").config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    data.pop("rope_scaling", None)
    data["rope_parameters"] = {k: v for k, v in SCALINGS["llama3"].items() if k != "high_freq_factor"}
    with pytest.raises(ConfigError, match="rope_parameters.high_freq_factor: must be a number"):
        DecoderConfig.from_hf(data, "config.json")
