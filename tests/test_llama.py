"""The Llama-family decoder against a reference nobody here wrote: transformers' own Llama, Qwen2 and Mistral.

Tiny random models built by transformers itself (no hub), saved with `save_pretrained`, loaded by
Tierline's loader: the same logits (fp32, 1e-4) with padding and a KV cache, the same greedy tokens over
64 steps through the torch engine, and files transformers loads back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tierline.build.packing import Packing, forward_packed
from tierline_cloud_node.engine import TorchEngine
from tierline_shared.models.configs import ConfigError, DecoderConfig
from tierline_shared.models.llama import Decoder, load_decoder, save_decoder
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import EngineInfo, GenerationParams

transformers = pytest.importorskip("transformers")
TOK = TextTokenizer.default()
STEPS = 64


def hf_model(kind: str):
    """A tiny random model of the kind, as transformers' own tests build them (vocab = our tokenizer's)."""
    common = dict(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                  bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id, rope_theta=5000.0)
    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2, "llama_tied": 3}[kind])
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=True))
    elif kind == "llama_tied":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, tie_word_embeddings=True))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=9))
    with torch.no_grad():  # random biases and norms, so that a wrong name or a missing term shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model.eval()


KINDS = ("llama", "llama_tied", "qwen2", "mistral")


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    """(transformers' model, ours loaded from its save_pretrained files, the directory)."""
    ref = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(directory, safe_serialization=True)
    return ref, load_decoder(directory), directory


def test_the_config_is_read_as_transformers_wrote_it(pair):
    ref, ours, _ = pair
    c = ours.cfg
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 12)
    assert c.architecture == ref.config.architectures[0]
    assert ours.num_params() == sum(p.numel() for p in ref.parameters()) == c.num_params()


def test_logits_with_padding_and_a_kv_cache_match_transformers(pair):
    ref, ours, _ = pair
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, TOK.vocab_size, (2, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got, _ = ours(ids, mask, positions)
        real = mask.bool()  # a padding position's logits mean nothing (each library fills them its own way)
        torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
        # the same tokens in two steps, the second on the first one's cache
        first, past = ours(ids[:, :10], mask[:, :10], positions[:, :10])
        second, _ = ours(ids[:, 10:], mask, positions[:, 10:], past)
    torch.testing.assert_close(torch.cat([first, second], dim=1)[real], want[real], atol=1e-4, rtol=1e-4)


def test_greedy_tokens_through_the_torch_engine_match_transformers_generate(pair):
    ref, ours, _ = pair
    c = ours.cfg
    engine = TorchEngine(ours, TOK, EngineInfo("cloud", "t", "0", c.num_params(), 0, c.max_position_embeddings,
                                               c.window_limit))
    prompts = ["Q:2+3=?\nA:", "Q:a=3;b=a+4;c=b*2;d=c-1;e=d+5;e=?\nA:"]  # the second is longer than Mistral's window
    for prompt in prompts:
        ids = torch.tensor([TOK.encode(prompt)])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                               do_sample=False, pad_token_id=TOK.pad_id, eos_token_id=None)
        want = out[0, ids.shape[1]:].tolist()
        got = engine.generate_batch([prompt], [GenerationParams(max_tokens=STEPS)])[0].token_ids
        stop = want.index(TOK.eos_id) if TOK.eos_id in want else len(want)  # the engine stops at the end token
        assert got == want[:stop] and len(got) >= min(stop, STEPS), (prompt, got[:10], want[:10])


def test_our_files_load_in_transformers(pair, tmp_path):
    _, ours, _ = pair
    save_decoder(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.randint(4, TOK.vocab_size, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], back(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [ours.cfg.architecture]


def test_what_is_not_served_is_refused_naming_the_field(tmp_path):
    base = {**hf_model("llama").config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    cases = {
        "architectures": {**base, "architectures": ["GPT2LMHeadModel"]},
        "rope_scaling": {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        "hidden_act": {**base, "hidden_act": "gelu"},
        "num_key_value_heads": {**base, "num_key_value_heads": 3},
        "head_dim": {**base, "head_dim": 7},  # rotary embeddings rotate pairs of dimensions
    }
    for field, data in cases.items():
        with pytest.raises(ConfigError, match=field):
            DecoderConfig.from_hf(data, "config.json")


def test_weights_that_do_not_fit_the_config_name_the_file(pair, tmp_path):
    ref, ours, _ = pair
    smaller = Decoder(ours.cfg.replace(intermediate_size=30))
    save_decoder(smaller, tmp_path)
    ours.cfg.write(tmp_path)  # the original config beside the smaller weights
    with pytest.raises(ValueError, match="model.safetensors: the weights do not fit"):
        load_decoder(tmp_path)


@pytest.fixture(scope="module")
def exported(pair, tmp_path_factory):
    """Ours exported to one ONNX decoder graph (fp32) and its int8 quantization, each behind the edge engine."""
    from tierline.build.export_onnx import export_onnx, quantize_int8
    from tierline_edge_node.engine import OnnxEngine

    _, ours, _ = pair
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(ours, out / "model.onnx")
    calib = [TOK.encode(p) for p in ("Q:2+3=?\nA:", "Q:a=3;b=a+4;b=?\nA:", "Q:max(3,9,4)=?\nA:")]
    quantize_int8(out / "model.onnx", out / "model.int8.onnx", calib)
    ours.cfg.write(out)  # config.json beside the graphs: the engine reads the shapes from it
    return {name: OnnxEngine.load(out / f"{name}.onnx", TOK, threads=1) for name in ("model", "model.int8")}


def _reference_tokens(ref, prompt: str) -> list[int]:
    ids = torch.tensor([TOK.encode(prompt)])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                           do_sample=False, pad_token_id=TOK.pad_id, eos_token_id=None)
    want = out[0, ids.shape[1]:].tolist()
    return want[:want.index(TOK.eos_id)] if TOK.eos_id in want else want


PROMPTS = ["Q:2+3=?\nA:", "Q:a=3;b=a+4;c=b*2;d=c-1;e=d+5;e=?\nA:",
           "Q:Tom has 3 pens. Tom gets 2 pens. How many pens has Tom?\nA:"]


def test_the_fp32_onnx_graph_generates_what_transformers_does(pair, exported):
    ref, _, _ = pair
    for prompt in PROMPTS:
        got = exported["model"].generate_batch([prompt], [GenerationParams(max_tokens=STEPS)])[0].token_ids
        assert got == _reference_tokens(ref, prompt), prompt


def test_the_int8_graph_agreement_is_measured(pair, exported):
    """int8 is an approximation: how many greedy tokens it shares with transformers before the first difference
    is measured (random tiny models have flat distributions, the worst case for it); the KV cache changes nothing
    (checked where the recompute needs no window: the graph itself attends to all it is given)."""
    ref, ours, _ = pair
    int8 = exported["model.int8"]
    shared = []
    for prompt in PROMPTS:
        got = int8.generate_batch([prompt], [GenerationParams(max_tokens=STEPS)])[0]
        want = _reference_tokens(ref, prompt)
        shared.append(next((i for i, (a, b) in enumerate(zip(got.token_ids, want)) if a != b), len(want)))
        if not ours.cfg.sliding_window:
            assert got.text == int8.generate_uncached(prompt, max_tokens=STEPS)  # cached == recomputed, exactly
    print(f"int8: greedy tokens equal to transformers' before the first difference: {shared} of {STEPS}")
    assert max(shared) >= 1


@pytest.fixture(scope="module")
def lite(pair, tmp_path_factory):
    """Ours exported to .tflite (prefill_* + decode signatures, external KV cache) behind the device engine."""
    pytest.importorskip("litert_torch")
    from tierline.build.export_tflite import export_tflite
    from tierline_device_agent.engine import LiteRTEngine

    _, ours, _ = pair
    out = tmp_path_factory.mktemp("tflite")
    # one prefill length: the longer prompts prefill in chunks of 32 (test_litert_engine covers several lengths)
    export_tflite(ours, out / "model.tflite", prefill_lens=(32,))
    return LiteRTEngine.load(out / "model.tflite", TOK, threads=1)


def test_the_litert_export_generates_what_transformers_does(pair, lite):
    ref, _, _ = pair
    for prompt in PROMPTS:
        got = lite.generate_batch([prompt], [GenerationParams(max_tokens=STEPS)])[0].token_ids
        assert got == _reference_tokens(ref, prompt), prompt


@pytest.mark.parametrize("window, rope", [(0, {}), (3, {}), (0, {"rope_type": "linear", "rope_factor": 8.0})])
def test_packed_forward_equals_padded_forward(window, rope):
    """The training forward without padding gives the padded forward's logits and gradients (the pruned model's
    recovery trains with it: a rope-scaled checkpoint's too)."""
    torch.manual_seed(1)
    cfg = DecoderConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                        sliding_window=window, architecture="MistralForCausalLM" if window else "LlamaForCausalLM",
                        **rope)
    model = Decoder(cfg)
    if rope:  # weights large enough that attention, hence the rotation, shows in the logits
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
    lengths = [9, 7, 7, 4, 2]  # three groups of two rows, the last one short
    ids = torch.randint(4, 50, (len(lengths), max(lengths)))
    real = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    select = real & (torch.rand(real.shape) < 0.6)
    padded, _ = model(ids, real.long())  # the masked path: padding keys masked out
    packing = Packing.from_lengths(lengths, group_rows=2)
    packed = forward_packed(model, ids[real], packing, select[real])
    torch.testing.assert_close(packed, padded[select], atol=1e-5, rtol=1e-4)
    grads = []
    for logits in (padded[select], packed):
        model.zero_grad()
        logits.square().sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packing_rejects_empty_rows():
    with pytest.raises(ValueError, match="at least one token"):
        Packing.from_lengths([3, 0])


def transformers_greedy(checkpoint: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's greedy continuation as transformers gives it: AutoModelForCausalLM and AutoTokenizer
    loaded offline from `checkpoint`, the tokenizer's own encoding (<bos> first)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    texts = []
    for prompt in prompts:
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert ids[0, 0] == hf_tok.bos_token_id
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
        texts.append(hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_the_built_cloud_checkpoint_is_served_by_transformers_with_the_same_text(tiny_family):
    """The family's cloud tier is a Hugging Face checkpoint: AutoModelForCausalLM and AutoTokenizer load it offline,
    and transformers' greedy text equals the cloud tier's on benchmark problems."""
    from tierline.build.engines import load_engine
    from tierline_shared.tasks.problems import generate

    cloud = tiny_family / "cloud"
    engine = load_engine(tiny_family, "cloud", threads=1)
    problems = generate("test", 20, seed=3)
    theirs = transformers_greedy(cloud, [p.prompt for p in problems], 48)
    for p, text in zip(problems, theirs):
        assert text == engine.generate(p.prompt, GenerationParams(max_tokens=48)).text, p.prompt
    hf_tok = transformers.AutoTokenizer.from_pretrained(cloud, local_files_only=True)
    messages = [{"role": "user", "content": "2+3=?"}]
    chat = hf_tok.apply_chat_template(messages, tokenize=False)
    assert chat == "<bos>Q:2+3=?\nA:"  # the template gives the family's prompt format, with its BOS
    # tokenized as apply_chat_template does (no BOS of the tokenizer's own): the completion prompt's tokens
    ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == engine.tokenizer.encode("Q:2+3=?\nA:") == engine.tokenizer.encode(chat, bos=False)


def test_the_committed_cloud_model_generates_what_transformers_generates():
    """The committed family's cloud tier, loaded by transformers (AutoModelForCausalLM, AutoTokenizer: its own
    encoding, <bos> first), gives the cloud tier's greedy text on 100 benchmark problems."""
    from tests.conftest import COMMITTED_MODELS
    from tierline.build.engines import load_engine
    from tierline.build.evaluate import EVAL_MAX_TOKENS
    from tierline_shared.tasks.problems import generate

    problems = generate("test", 100, seed=11)
    ours = [r.text for r in load_engine(COMMITTED_MODELS, "cloud", threads=2).generate_batch(
        [p.prompt for p in problems], [GenerationParams(max_tokens=EVAL_MAX_TOKENS) for _ in problems])]
    theirs = transformers_greedy(COMMITTED_MODELS / "cloud", [p.prompt for p in problems], EVAL_MAX_TOKENS)
    for p, a, b in zip(problems, theirs, ours):
        assert a == b, p.prompt


def _logits_match(ref, directory: Path, T: int = 40) -> None:
    """Ours loaded from `directory` gives transformers' logits over T tokens (longer than the windows below)."""
    ours = load_decoder(directory)
    ids = torch.randint(4, TOK.vocab_size, (1, T), generator=torch.Generator().manual_seed(5))
    mask, positions = torch.ones_like(ids), torch.arange(T)[None]
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got, _ = ours(ids, mask, positions)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _tiny_config(**extra) -> dict:
    return dict(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                bos_token_id=TOK.bos_id, eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id, **extra)


@pytest.mark.parametrize("kind, extra, window", [
    # transformers slides Qwen2's layers i >= max_window_layers only (default 28): none of these two
    ("qwen2", dict(use_sliding_window=True, sliding_window=8), 0),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), 8),  # every layer
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), 0),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, layer_types=["sliding_attention"] * 2), 8),
    ("qwen2", dict(use_sliding_window=False, sliding_window=8, max_window_layers=0), 0),
    ("qwen2_old", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), 8),  # no layer_types
    ("qwen2_old", dict(use_sliding_window=True, sliding_window=8), 0),
    ("llama", dict(use_sliding_window=True, sliding_window=8), 0),  # Llama has no sliding window at all
    ("mistral", dict(sliding_window=8), 8),
    ("mistral", dict(sliding_window=None), 0),
    ("mistral", dict(sliding_window=512), 0),  # longer than the positions (256): hides nothing
    ("mistral_nokey", dict(max_position_embeddings=8192), "transformers"),  # its default window (4096)
    ("mistral_nokey", dict(), 0),  # that default, longer than these positions (256): none
])
def test_the_sliding_window_is_read_as_transformers_reads_it(tmp_path, kind, extra, window):
    torch.manual_seed(4)
    if kind.startswith("qwen2"):
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_tiny_config(**extra)))
    elif kind.startswith("mistral"):
        ref = transformers.MistralForCausalLM(transformers.MistralConfig(**{**_tiny_config(), **extra}))
    else:
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_tiny_config()))
    ref.eval().save_pretrained(tmp_path, safe_serialization=True)
    data = json.loads((tmp_path / "config.json").read_text())
    if kind not in ("qwen2", "mistral"):  # Qwen2 as older transformers wrote it (no layer_types); Mistral with
        # no sliding_window key at all; Llama with keys its config drops
        data = ({k: v for k, v in data.items() if k != "layer_types"} if kind == "qwen2_old" else
                {k: v for k, v in data.items() if k != "sliding_window"} if kind == "mistral_nokey" else
                {**data, **extra})
        (tmp_path / "config.json").write_text(json.dumps(data))
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
        assert ref.config.sliding_window in (None, 8, transformers.MistralConfig().sliding_window)
    if window == "transformers":  # the window transformers gives the file (too long to compare logits over)
        assert DecoderConfig.read(tmp_path).sliding_window == ref.config.sliding_window > 0
        return
    assert DecoderConfig.read(tmp_path).sliding_window == window
    _logits_match(ref, tmp_path)


@pytest.mark.parametrize("extra, field", [
    (dict(max_window_layers=1), "max_window_layers"),  # layer 0 full, layer 1 sliding
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
])
def test_a_window_on_some_layers_only_is_refused_naming_the_field(extra, field):
    data = {**transformers.Qwen2Config(**_tiny_config(use_sliding_window=True, sliding_window=8, **extra)).to_dict(),
            "architectures": ["Qwen2ForCausalLM"]}
    if field == "max_window_layers":  # as transformers < 4.53 wrote it: no layer_types, derived from it
        del data["layer_types"]
    with pytest.raises(ConfigError, match=f"config.json: {field}: .* some layers only"):
        DecoderConfig.from_hf(data, "config.json")


def test_our_qwen2_file_with_a_window_loads_in_transformers_with_the_window(tmp_path):
    torch.manual_seed(2)
    cfg = DecoderConfig(**_tiny_config(), qkv_bias=True, sliding_window=8, architecture="Qwen2ForCausalLM")
    save_decoder(Decoder(cfg).eval(), tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert back.config.layer_types == ["sliding_attention"] * 2
    _logits_match(back, tmp_path)


def test_legacy_rotary_buffers_in_the_weights_are_ignored(tmp_path):
    """Checkpoints saved by transformers < 4.31 carry `rotary_emb.inv_freq` buffers; transformers ignores them."""
    from safetensors.torch import load_file, save_file

    ref = hf_model("llama")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    state = load_file(str(tmp_path / "model.safetensors"))
    for i in range(2):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _logits_match(ref, tmp_path)


def test_config_messages_name_the_file_once_and_swish_is_silu():
    base = {**hf_model("llama").config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    data = {k: v for k, v in base.items() if k != "max_position_embeddings"}
    with pytest.raises(ConfigError) as exc:
        DecoderConfig.from_hf(data, "/x/config.json")
    assert str(exc.value) == "/x/config.json: max_position_embeddings: required"
    assert DecoderConfig.from_hf({**base, "hidden_act": "swish"}) == DecoderConfig.from_hf(base)  # ACT2FN: SiLU


def test_every_end_token_the_checkpoint_lists_stops_generation_as_in_transformers(tmp_path):
    """generation_config.json's eos_token_id list (Llama-3-Instruct, Qwen2-Instruct): transformers' generate stops
    at any of them, and so do the cloud engine (the checkpoint as it is), the edge's and the device's (their
    exports, each with the config.json the export writes beside it)."""
    from tierline.build.export_onnx import export_onnx
    from tierline_edge_node.engine import OnnxEngine

    ref = hf_model("llama")
    prompt = PROMPTS[1]
    ids = torch.tensor([TOK.encode(prompt)])

    def generate():
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                               pad_token_id=TOK.pad_id)
        return out[0, ids.shape[1]:].tolist()

    ref.generation_config.eos_token_id = None
    free = generate()
    # pretend a token it says after a few others is the model's second end token (as Llama-3's <|eot_id|>)
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    extra = free[k]
    assert TOK.eos_id not in free[:k + 1]
    ref.generation_config.eos_token_id = [TOK.eos_id, extra]
    ref.save_pretrained(tmp_path / "cloud", safe_serialization=True)
    want = generate()
    assert want == free[:k + 1]  # transformers stops at the listed token (and keeps it)
    cloud = TorchEngine.load(tmp_path / "cloud", TOK)
    got = cloud.generate(prompt, GenerationParams(max_tokens=24))
    assert got.token_ids == want[:-1] and got.finish_reason == "stop"  # Tierline leaves end tokens out of the text
    export_onnx(cloud.model, tmp_path / "edge" / "model.onnx")
    cloud.model.cfg.write(tmp_path / "edge")  # as the importer writes the edge's config.json
    edge = OnnxEngine.load(tmp_path / "edge" / "model.onnx", TOK, threads=1)
    assert edge.generate(prompt, GenerationParams(max_tokens=24)).token_ids == want[:-1]
    assert json.loads((tmp_path / "edge" / "config.json").read_text())["eos_token_id"] == [TOK.eos_id, extra]
    pytest.importorskip("litert_torch")
    from tierline.build.export_tflite import export_tflite
    from tierline_device_agent.engine import LiteRTEngine

    export_tflite(cloud.model, tmp_path / "device" / "model.tflite", prefill_lens=(32,))  # + its config.json
    device = LiteRTEngine.load(tmp_path / "device" / "model.tflite", TOK, threads=1)
    assert device.generate(prompt, GenerationParams(max_tokens=24)).token_ids == want[:-1]
