"""`tierline models import`: a checkpoint nobody here built (transformers' own tiny random Llama, saved in shards,
with a byte-level BPE tokenizer that has Llama's special tokens) becomes all three tiers, served by the real stack.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tierline.build.corpus import BUILTIN_TEXTS

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [f"{t} Note {i}: {t[::-1][:40]}" for i, t in enumerate(BUILTIN_TEXTS * 2)]
# a chat template that names the special tokens, as Llama's and Mistral's do
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


def bpe_tokenizer(specials: dict, vocab: int = 320):
    """A byte-level BPE trained here on a little text, in transformers' fast-tokenizer wrapper."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[v for v in specials.values() if v],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if specials.get("bos_token"):  # as Llama's tokenizer.json does: the post-processor starts with BOS
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
            (bos, tok.token_to_id(bos))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def llama_checkpoint(directory: Path, shard: bool = True) -> Path:
    """transformers' LlamaForCausalLM with random weights and its tokenizer, saved as a user would have it."""
    hf_tok = bpe_tokenizer({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=hf_tok.bos_token_id,
                                   eos_token_id=hf_tok.eos_token_id, rope_theta=10000.0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB" if shard else "10GB")
    hf_tok.chat_template = CHAT_TEMPLATE  # transformers 5 saves it to chat_template.jinja
    hf_tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    src = llama_checkpoint(tmp_path_factory.mktemp("src") / "my-llama")
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    out = tmp_path_factory.mktemp("imported") / "models"
    proc = run_cli("models", "import", str(src), "--out", str(out), "--corpus", str(corpus), "--recover-steps", "20",
                   "--device-context", "128", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return src, out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_sharded_checkpoint_becomes_three_tiers_with_measured_quality(imported):
    src, out, summary = imported
    assert len(list(src.glob("model-*.safetensors"))) > 1  # the source really is sharded
    index = json.loads((out / "manifest.json").read_text())
    cloud = index["artifacts"]["cloud"]
    assert cloud["weights"]["path"] == "cloud/model.safetensors.index.json" and len(cloud["shards"]) > 1
    for shard in cloud["shards"]:  # the cloud artifact is the checkpoint as it is
        assert (out / shard["path"]).read_bytes() == (src / Path(shard["path"]).name).read_bytes()
    assert index["artifacts"]["tokenizer_config"]["path"] == "tokenizer_config.json"
    assert {index["artifacts"][t]["format"] for t in ("edge", "device")} == {"onnx-int8", "tflite"}
    assert summary["params"]["device"] <= 0.35 * summary["params"]["cloud"]
    for tier in ("edge", "device"):  # measured, not assumed: shares in [0, 1] over the held-out prompts
        q = summary["quality_vs_cloud"][tier]
        assert q["n"] > 0 and 0.0 <= q["identical"] <= q["prefix_share"] <= 1.0
    assert json.loads((out / "cloud" / "card.json").read_text())["bytes"] == sum(s["bytes"] for s in cloud["shards"])
    # the router's prompt for a conversation is transformers' own, from the template the checkpoint saved
    from tierline_router.chat import ChatTemplate

    hf_tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    messages = [{"role": "user", "content": "Hi"}]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert want == "<s>[user] Hi</s>[assistant] " and ChatTemplate.of_models(out).render(messages) == want
    card = json.loads((out / "device" / "card.json").read_text())
    assert "recovered by distillation" in card["notes"] and card["training"]["recovery"]["steps"] == 20


def test_every_tier_speaks_the_checkpoints_own_tokens(imported):
    """The cloud's greedy text equals transformers' generate() on the source; the edge and device load with
    the checkpoint's special tokens (BOS <s>, stop at </s>)."""
    from tierline.build.engines import load_engine
    from tierline_shared.runtime.engine import GenerationParams

    src, out, _ = imported
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    cloud = load_engine(out, "cloud", threads=1)
    assert cloud.tokenizer.bos_id == hf_tok.bos_token_id and cloud.tokenizer.eos_id == hf_tok.eos_token_id
    for prompt in ("The quick brown fox", "Question: What is"):
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert ids[0, 0] == hf_tok.bos_token_id
        want = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                            pad_token_id=hf_tok.eos_token_id)[0, ids.shape[1]:]
        want_text = hf_tok.decode(want, skip_special_tokens=True)
        assert cloud.generate(prompt, GenerationParams(max_tokens=24)).text == want_text
    for tier in ("edge", "device"):
        engine = load_engine(out, tier, threads=1)
        assert engine.tokenizer.encode("Hi") == cloud.tokenizer.encode("Hi")
        assert engine.generate("The quick", GenerationParams(max_tokens=8)).completion_tokens >= 1


def test_the_imported_directory_runs_the_platform(imported):
    """`tierline up --models DIR` as the supervisor starts it: nats-server, three tiers, the router."""
    from tierline import InferenceClient
    from tierline_infra.supervisor import Stack

    _, out, _ = imported
    name = json.loads((out / "manifest.json").read_text())["model_name"]
    assert name == "my-llama"  # the source folder's name, unless --name says otherwise
    with Stack(out) as stack, InferenceClient(None, name, stack.router_address) as client:
        for prompt in ("Hello", "Question: What is the capital of France?\nAnswer:"):
            resp = client.infer(prompt, {"max_tokens": 8})
            assert resp.tier in ("device", "edge", "cloud") and resp.usage.completion_tokens >= 1


def test_a_conversation_reaches_the_model_as_transformers_tokenizes_it(imported):
    """Found by a fault hunt: a checkpoint whose chat template writes `{{ bos_token }}` (Llama 2 and 3, Mistral
    Instruct, most fine-tunes) had every /v1/chat/completions prompt read as <s><s>...: the router rendered the
    template, BOS included, and the tier's tokenizer added its own. Answers and logprobs differed from
    transformers with no error, and usage counted one token more. The router leaves the template's leading BOS to
    the tier's tokenizer now: the model reads what apply_chat_template(tokenize=True) gives, and the cloud's answer
    and usage are transformers' own, through the OpenAI client."""
    import openai

    from tierline_infra.supervisor import Stack

    src, out, _ = imported
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    messages = [{"role": "user", "content": "Question: What is the capital of France?"}]
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == hf_tok.bos_token_id != ids[1]  # the template's BOS, once
    want = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=12, do_sample=False, eos_token_id=hf_tok.eos_token_id,
                        pad_token_id=hf_tok.eos_token_id)[0, len(ids):]
    name = json.loads((out / "manifest.json").read_text())["model_name"]
    with Stack(out, tiers=("cloud",), overrides={"router.device_complexity": 0.0,
                                                  "router.cloud_complexity": 0.0}) as stack:
        client = openai.OpenAI(api_key=stack.api_key or "none", base_url=stack.http_base_url, max_retries=0,
                               timeout=60)
        resp = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    assert resp.usage.prompt_tokens == len(ids), (resp.usage, len(ids))
    assert resp.choices[0].message.content == hf_tok.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("breakage, names", [
    ("architecture", "architectures: ['GPT2LMHeadModel']"),
    ("tokenizer", "tokenizer.json: missing"),
    ("mismatch", "do not fit"),
    ("ratio", "--device-ratio"),
    ("out", "--out"),
    ("out_file", "--out"),  # an existing file, not a directory
    ("vocab", "config.json: model vocabulary (1024) does not match the tokenizer's"),  # up front, not at the end
])
def test_bad_input_is_one_line_naming_the_file_or_flag_exit_2(tmp_path, breakage, names):
    src = llama_checkpoint(tmp_path / "src", shard=False)
    out, extra = tmp_path / "out", []
    if breakage == "architecture":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    elif breakage == "tokenizer":
        (src / "tokenizer.json").unlink()
    elif breakage == "mismatch":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    elif breakage == "ratio":
        extra = ["--device-ratio", "0.01"]
    elif breakage == "out_file":
        out.write_text("mine")
    elif breakage == "vocab":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 1024}))
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    proc = run_cli("models", "import", str(src), "--out", str(out), *extra, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], proc.stderr
    if breakage == "out":
        assert (out / "keep.txt").read_text() == "mine"
    if breakage == "out_file":
        assert out.read_text() == "mine"


def test_a_tokenizer_without_bos_or_unk_is_served_as_its_config_says(tmp_path):
    """Qwen2's kind: no BOS token (prompts start with none), no <unk>, padding with EOS."""
    from tierline_shared.models.tokenizer import TextTokenizer

    bpe_tokenizer({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}).save_pretrained(tmp_path)
    tok = TextTokenizer.load(tmp_path / "tokenizer.json")
    assert tok.bos_id is None and tok.unk_id is None and tok.pad_id == tok.eos_id
    assert tok.encode("Hello")[0] != tok.eos_id and tok.unknown_count("日本") == 0
    assert tok.decode(tok.encode("Hello there")) == "Hello there"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    with pytest.raises(ValueError, match="eos_token '<\\|im_end\\|>' is not in the vocabulary"):
        TextTokenizer.load(tmp_path / "tokenizer.json")


def test_routing_is_calibrated_from_prompts_alone(imported, tmp_path):
    """No answers: each lower tier is labelled by agreement with the cloud, the scorer is trained on the labels
    and listed in the models index, the thresholds land in the manifest, and the router loads the result."""
    import shutil

    import yaml

    from tierline_infra.supervisor import write_manifest
    from tierline_router.scorer import load_scorer
    from tierline_shared.config.manifest import load_manifest

    class _Nats:  # only its address and credentials go into the manifest
        url, user, password, credentials = "nats://127.0.0.1:4222", "u", "p", None

    models = tmp_path / "models"
    shutil.copytree(imported[1], models)
    path = write_manifest(tmp_path / "m.yaml", models, _Nats())
    assert "scorer" not in (yaml.safe_load(path.read_text()).get("router") or {})  # nothing to route with yet
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t[: 20 + i]}) + "\n" for i, t in enumerate(CORPUS)))
    proc = run_cli("route", "calibrate", "--prompts", str(prompts), "--max-tokens", "8", "--target-edge-share",
                   "0.9", "--manifest", str(path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["labels"] == "agreement with the cloud" and out["calib"]["share_below_cloud"] >= 0.9
    assert out["calib"]["cloud_only_accuracy"] == 1.0  # the cloud agrees with itself
    manifest = load_manifest(path)
    assert manifest.router.scorer == "router/scorer.json"
    assert load_scorer(manifest) is not None  # trained for exactly these artifacts (sha256 checked)
    assert "labelled by agreement with the cloud" in (models / "router" / "card.md").read_text()
    assert "router_scorer" in json.loads((models / "manifest.json").read_text())["artifacts"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    proc = run_cli("route", "calibrate", "--prompts", str(bad), "--target-edge-share", "0.9", "--manifest", str(path))
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_agreement_labels_follow_the_documented_normalisation():
    from tierline.build.labels import ANSWER_REGEX, Agreement

    plain = Agreement()
    assert plain.same("  The answer\n is  42 ", "the ANSWER is 42")
    assert not plain.same("The answer is 41", "The answer is 42")
    marker = Agreement(ANSWER_REGEX)
    assert marker.same("p=3;q=p+4;q?7####7", "q=7####7")  # only the final answers are compared
    assert not marker.same("####8", "####7") and not marker.same("no marker", "####7")
    assert marker.same("no marker", "No  marker")  # neither has the form: the whole texts
    with pytest.raises(ValueError, match="--extract"):
        Agreement("(unclosed")
