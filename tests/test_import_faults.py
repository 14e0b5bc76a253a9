"""`tierline models import` with checkpoints a careless or hostile user brings: each is served as transformers serves
it, or refused before anything is written with one line naming the file and the field (exit 2).

The checkpoints are tests/test_import.py's (transformers' tiny random Llama and a byte-level BPE), changed the way
a user's might be.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tests.test_import import bpe_tokenizer, llama_checkpoint

transformers = pytest.importorskip("transformers")


def _refused(src: Path, out: Path, *extra: str) -> str:
    """The one line `tierline models import` prints when it refuses the checkpoint; nothing is left at --out."""
    proc = run_cli("models", "import", str(src), "--out", str(out), *extra, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("shard", ["../stolen.safetensors", "{outside}/stolen.safetensors", "sub/model.safetensors"])
def test_a_shard_index_names_only_files_beside_it(tmp_path, shard):
    """A weight_map entry that is a path would read a file from elsewhere on the machine (and the copy of the
    checkpoint, which keeps the index as it is, could not hold it): refused naming the index and the entry."""
    from tierline_shared.models.llama import check_weights

    src = llama_checkpoint(tmp_path / "src")
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copyfile(src / first, tmp_path / "stolen.safetensors")  # a real safetensors file outside the checkpoint
    (src / "sub").mkdir()
    shutil.copyfile(src / first, src / "sub" / "model.safetensors")
    shard = shard.format(outside=tmp_path)  # an absolute path
    index["weight_map"] = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"model.safetensors.index.json: weight_map: {shard!r} is not a file name"):
        check_weights(src)
    if shard == "../stolen.safetensors":  # and from the command line: before anything is written
        line = _refused(src, tmp_path / "out")
        assert f"{index_file}: weight_map: '../stolen.safetensors' is not a file name" in line


def test_a_layer_count_the_weights_do_not_have_is_refused_from_the_headers(tmp_path):
    """An absurd num_hidden_layers is refused before the model is built (each layer is Python objects even on
    torch's meta device: ten million of them held 20 GB before the old check could say anything)."""
    src = llama_checkpoint(tmp_path / "src", shard=False)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100_000}))
    line = _refused(src, tmp_path / "out")
    assert line.endswith(f"{src / 'model.safetensors'}: the weights do not fit {src / 'config.json'}: "
                         f"num_hidden_layers is 100000, the weights hold 4 layers")


@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", "1e-5", "rms_norm_eps: must be a number, got '1e-5'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "1e4"}, "rope_theta: must be a number, got '1e4'"),
    ("eos_token_id", "</s>", "eos_token_id: '</s>' is not a token id or a list of them"),
])
def test_a_config_value_of_the_wrong_type_names_the_file_and_the_field(tmp_path, field, value, message):
    from tierline_shared.models.configs import ConfigError, DecoderConfig

    src = llama_checkpoint(tmp_path / "src", shard=False)
    (src / "generation_config.json").unlink()  # config.json's own eos_token_id is the one read
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ConfigError) as exc:
        DecoderConfig.read(src)
    assert str(exc.value) == f"{src / 'config.json'}: {message}"
    (src / "config.json").write_bytes(b'{"architectures": ["LlamaForCausalLM\xff"]}')  # not UTF-8
    with pytest.raises(ConfigError, match="config.json: not UTF-8 text"):
        DecoderConfig.read(src)


def test_a_folder_name_that_is_not_utf8_is_refused_up_front(tmp_path):
    """tokenizers, safetensors and the cards take UTF-8 text: a folder name with other bytes failed one of them
    with a message about codecs (the tokenizer's: "not a valid tokenizer file"), or at the very end."""
    src = Path(os.fsdecode(bytes(tmp_path) + b"/my-llama-\xff"))
    os.rename(llama_checkpoint(tmp_path / "my-llama", shard=False), src)  # transformers cannot save there itself
    line = _refused(src, tmp_path / "out")
    assert line == f"tierline: error: SRC: {ascii(str(src))} is not UTF-8 text; rename it"


def test_a_tokenizer_saved_by_tokenizers_alone_is_served_with_the_configs_end_token(tmp_path):
    """No tokenizer_config.json (tokenizer.json written by `tokenizers`) and no generation_config.json: the end and
    start tokens are the ids config.json names, as transformers' generate reads them; the import used to refuse it
    for lacking the family's own `<eos>`. The cloud tier then generates what transformers does, token for token."""
    from tierline.build.engines import load_engine
    from tierline_shared.runtime.engine import GenerationParams

    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    hf_tok = bpe_tokenizer(specials)
    src = tmp_path / "src"
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                                   tie_word_embeddings=True)
    ref = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()  # MHA, tied, fp16 on disk
    ref.save_pretrained(src, safe_serialization=True)
    (src / "generation_config.json").unlink()
    hf_tok.backend_tokenizer.save(str(src / "tokenizer.json"))  # the `tokenizers` file alone
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]

    out = tmp_path / "out"
    proc = run_cli("models", "import", str(src), "--out", str(out), "--device-context", "32", "--device-ratio", "0.6",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"bos_token": "<s>", "eos_token": "</s>"}
    assert sorted(p.name for p in (out / "cloud").iterdir() if not p.name.startswith("card")) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]

    theirs = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)  # no special tokens of its own
    ref = ref.float()
    cloud = load_engine(out, "cloud", threads=1)
    assert cloud.tokenizer.eos_id == hf_tok.eos_token_id
    for prompt in ("The quick brown fox", "Question: What is"):
        ids = theirs(prompt, return_tensors="pt").input_ids
        assert cloud.tokenizer.encode(prompt) == ids[0].tolist() and ids[0, 0] == hf_tok.bos_token_id
        with torch.no_grad():
            want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                pad_token_id=hf_tok.eos_token_id)[0, ids.shape[1]:].tolist()
        want = want[:want.index(hf_tok.eos_token_id)] if hf_tok.eos_token_id in want else want
        assert cloud.generate(prompt, GenerationParams(max_tokens=24)).token_ids == want


def _old_checkpoint(directory: Path, tokenizer_config: dict | None, special_tokens_map: dict | None,
                    eos_in_config: bool = True) -> tuple[Path, object, dict]:
    """A small Llama (MHA, tied, fp16 on disk) whose tokenizer files are laid out as older checkpoints have them:
    `tokenizer_config` (None: no file) and `special_tokens_map` (None: no file) as given; config.json and
    generation_config.json name the end token unless not `eos_in_config`. Returns the folder, transformers' model
    (the reference) and the tokenizer's special tokens."""
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    hf_tok = bpe_tokenizer(specials)
    torch.manual_seed(2)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                                   tie_word_embeddings=True)
    ref = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()
    ref.save_pretrained(directory, safe_serialization=True)
    hf_tok.backend_tokenizer.save(str(directory / "tokenizer.json"))
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if special_tokens_map is not None:
        (directory / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    if not eos_in_config:
        for name in ("config.json", "generation_config.json"):
            data = json.loads((directory / name).read_text())
            (directory / name).write_text(json.dumps({k: v for k, v in data.items() if k != "eos_token_id"}))
    return directory, ref, {k: hf_tok.convert_tokens_to_ids(v) for k, v in specials.items()}


def _added(content: str) -> dict:
    """A special token as special_tokens_map.json (and older tokenizer_config.json) writes it: an AddedToken."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


# tokenizer_config.json as PreTrainedTokenizerFast wrote it before special tokens moved into it
OLD_TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
                        "clean_up_tokenization_spaces": False}
OLD_SPECIAL_TOKENS_MAP = {"bos_token": _added("<s>"), "eos_token": _added("</s>"), "unk_token": _added("<unk>")}


@pytest.mark.parametrize("layout", ["special_tokens_map", "config_ids"])
def test_an_end_token_outside_tokenizer_config_is_served_as_transformers_generates(tmp_path, layout):
    """An older checkpoint's tokenizer_config.json names no eos_token: its special tokens are in
    special_tokens_map.json, or only config.json and generation_config.json name the end token's id. transformers
    reads the one (AutoTokenizer) and stops at the other (generate); the import refused both ("eos_token:
    missing"). The cloud tier now generates what transformers does, token for token."""
    from tierline.build.engines import load_engine
    from tierline_shared.runtime.engine import GenerationParams

    if layout == "special_tokens_map":
        src, ref, ids = _old_checkpoint(tmp_path / "src", OLD_TOKENIZER_CONFIG, OLD_SPECIAL_TOKENS_MAP)
    else:
        src, ref, ids = _old_checkpoint(tmp_path / "src", {**OLD_TOKENIZER_CONFIG, "bos_token": "<s>",
                                                           "unk_token": "<unk>"}, None)
    theirs = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    assert theirs.bos_token == "<s>"
    assert theirs.eos_token == ("</s>" if layout == "special_tokens_map" else None)  # else generate's ids say

    out = tmp_path / "out"
    proc = run_cli("models", "import", str(src), "--out", str(out), "--device-context", "32", "--device-ratio", "0.6",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "cloud" / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    ref = ref.float()
    cloud = load_engine(out, "cloud", threads=1)
    assert (cloud.tokenizer.bos_id, cloud.tokenizer.eos_id) == (ids["bos_token"], ids["eos_token"])
    for prompt in ("The quick brown fox", "Question: What is"):
        prompt_ids = theirs(prompt, return_tensors="pt").input_ids
        assert cloud.tokenizer.encode(prompt) == prompt_ids[0].tolist() and prompt_ids[0, 0] == ids["bos_token"]
        with torch.no_grad():
            want = ref.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=24,
                                do_sample=False, pad_token_id=ids["eos_token"])[0, prompt_ids.shape[1]:].tolist()
        want = want[:want.index(ids["eos_token"])] if ids["eos_token"] in want else want
        assert cloud.generate(prompt, GenerationParams(max_tokens=24)).token_ids == want


@pytest.mark.parametrize("tokenizer_config, special_tokens_map", [
    (OLD_TOKENIZER_CONFIG, OLD_SPECIAL_TOKENS_MAP),  # the map alone names them
    (None, {"eos_token": "<unk>"}),  # no tokenizer_config.json: the map's, not config.json's id
    ({**OLD_TOKENIZER_CONFIG, "eos_token": "</s>"}, {"eos_token": "<unk>"}),  # the map wins (transformers' rule)
    ({**OLD_TOKENIZER_CONFIG, "eos_token": None}, {"eos_token": _added("</s>")}),
    ({**OLD_TOKENIZER_CONFIG, "eos_token": "</s>", "added_tokens_decoder": {}}, {"eos_token": "<unk>"}),  # map unread
])
def test_the_end_token_is_read_from_the_files_transformers_reads(tmp_path, tokenizer_config, special_tokens_map):
    """tokenizer_config.json and special_tokens_map.json are read as transformers' AutoTokenizer reads them: the
    map's tokens over the config's, unless the config has added_tokens_decoder (then the map is not read)."""
    from tierline.build.importer import _check_source

    src, _, _ = _old_checkpoint(tmp_path / "src", tokenizer_config, special_tokens_map)
    theirs = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    _, tok, _ = _check_source(src)
    assert theirs.eos_token_id is not None and tok.eos_id == theirs.eos_token_id
    for text in ("Hello there", "The quick brown fox"):
        assert tok.encode(text) == theirs(text).input_ids


@pytest.mark.parametrize("special_tokens_map", [None, {"bos_token": "<s>"}, {"eos_token": None}])
def test_a_checkpoint_with_no_end_token_anywhere_is_refused_naming_where_it_was_looked_for(tmp_path,
                                                                                         special_tokens_map):
    """No eos_token in tokenizer_config.json or special_tokens_map.json, no eos_token_id in config.json or
    generation_config.json: generation would never stop. One line naming each file and field looked at."""
    src, _, _ = _old_checkpoint(tmp_path / "src", {**OLD_TOKENIZER_CONFIG, "bos_token": "<s>"}, special_tokens_map,
                                eos_in_config=False)
    line = _refused(src, tmp_path / "out")
    assert line == (f"tierline: error: {src / 'tokenizer_config.json'}: eos_token: missing, and neither "
                    f"{src / 'special_tokens_map.json'}'s eos_token nor the eos_token_id of "
                    f"{src / 'generation_config.json'} or {src / 'config.json'} names one (generation would never "
                    f"stop)")


def test_an_end_token_the_vocabulary_lacks_names_the_file_that_named_it(tmp_path):
    src, _, _ = _old_checkpoint(tmp_path / "src", OLD_TOKENIZER_CONFIG, {**OLD_SPECIAL_TOKENS_MAP,
                                                                         "eos_token": "<|im_end|>"})
    line = _refused(src, tmp_path / "out")
    want = f"{src / 'special_tokens_map.json'}: eos_token '<|im_end|>' is not in the vocabulary"
    assert line == f"tierline: error: {want}"


@pytest.mark.parametrize("how", ["--name", "folder"])
def test_a_model_name_no_request_can_carry_is_refused_at_import(tmp_path, how):
    """A request's `model` field is refused past limits.max_id_chars (128) characters: a longer model name
    (given with --name, or the checkpoint folder's own name) was imported, and then no request could name it.
    Refused at import, by the request's own limit."""
    from tierline_api.v1 import inference_pb2 as pb
    from tierline_shared.config.manifest import LimitsConfig
    from tierline_shared.serving.servicer import RequestError, validate_request

    limit = LimitsConfig().max_id_chars
    name = "m" * (limit + 1)
    with pytest.raises(RequestError, match="^model: "):  # what a request naming it is answered
        validate_request(pb.InferRequest(prompt="Hi", model=name), LimitsConfig(), name)
    validate_request(pb.InferRequest(prompt="Hi", model=name[:limit]), LimitsConfig(), name[:limit])
    line = _refused_name(tmp_path, how, name)
    assert line == (f"tierline: error: --name: {name!r}{'' if how == '--name' else ' (SRC folder name)'} is "
                    f"{limit + 1} characters; a request's model field takes at most {limit} (limits.max_id_chars)")


def _refused_name(tmp_path, how: str, name: str) -> str:
    """The import's one line refusing `name`, given as --name (`how` "--name") or as SRC's folder name."""
    if how == "--name":
        src, extra = llama_checkpoint(tmp_path / "src", shard=False), ["--name", name]
    else:
        src, extra = llama_checkpoint(tmp_path / name, shard=False), []
    return _refused(src, tmp_path / "out", *extra)


# -- the model's name: one rule (shared/models/names.py) for the import, requests, /v1/models/{name} and the boards --
TAKEN_NAMES = [
    "tierline-reasoner",  # the committed models' name
    "my-llama",  # a folder's own name (tests/test_import.py's checkpoint)
    "Qwen/Qwen2.5-0.5B-Instruct",  # Hugging Face's org/model
    "my llama",  # a space
    "acme/" + "r" * 80,  # a part longer than the 64 characters the boards took
    "llama3:8b",
    "modèle-ü",
]


@pytest.mark.parametrize("name", TAKEN_NAMES)
def test_a_name_the_import_takes_is_taken_by_requests_and_by_the_boards(name):
    """The boards refused (BAD_REQUEST: `tierline devices set-model` exits 2) names that the import took and the
    tiers served, a space, a ':', a part past 64 characters: a user learnt it only when pushing the model. The
    import, the request's `model` field and the signed update take one set of names now."""
    from tierline.build.importer import _check_name
    from tierline.devices import desired_model
    from tierline_api.v1 import inference_pb2 as pb
    from tierline_shared.config.manifest import LimitsConfig
    from tierline_shared.serving.servicer import validate_request

    _check_name(name, given=True)
    validate_request(pb.InferRequest(prompt="Hi", model=name), LimitsConfig(), name)
    assert desired_model("pi-1", name, "v1", b"weights", b"{}").name == name  # set-model signs it, a board reads it


@pytest.mark.parametrize("name, why", [
    ("what?", "holds '?': clients send a model's name unescaped in a URL path (GET /v1/models/NAME), where '?' ends "
              "or changes it"),
    ("v1#2", "holds '#'"),
    ("100%", "holds '%'"),
    ("tab\there", "holds a control or invisible character (U+0009)"),
    ("zero\u200bwidth", "holds a control or invisible character (U+200B)"),
    ("org//model", "has an empty, '.' or '..' part between '/'s"),
    ("org/../model", "has an empty, '.' or '..' part between '/'s"),
    ("org/model/", "has an empty, '.' or '..' part between '/'s"),
    ("", "is empty"),
])
def test_a_name_a_url_or_a_board_cannot_carry_is_refused_at_import(name, why):
    """Refused where the user gives it, naming --name, by the rule the boards refuse an update by (the import
    took any name of at most 128 characters)."""
    from tierline.build.importer import ImportFailure, _check_name
    from tierline.devices import desired_model
    from tierline_device_agent.ota import OtaCode, OtaError

    with pytest.raises(ImportFailure) as exc:
        _check_name(name, given=True)
    assert str(exc.value).startswith(f"--name: {name!r} {why}"), str(exc.value)
    with pytest.raises(OtaError) as refused:
        desired_model("pi-1", name, "v1", b"weights", b"{}")
    assert refused.value.code == OtaCode.BAD_REQUEST and why in str(refused.value)


@pytest.mark.parametrize("how", ["--name", "folder"])
def test_the_import_refuses_a_name_by_the_rule_in_one_line(tmp_path, how):
    """From the command line, before anything is written: the flag, and the folder when the name is its."""
    name = "what?"
    line = _refused_name(tmp_path, how, name)
    assert line == (f"tierline: error: --name: {name!r}{'' if how == '--name' else ' (SRC folder name)'} holds '?': "
                    f"clients send a model's name unescaped in a URL path (GET /v1/models/NAME), where '?' ends or "
                    f"changes it")


def test_a_hugging_face_name_is_imported_and_asked_for_by_the_openai_client(tmp_path):
    """`--name acme/tiny-llama` (Hugging Face's org/model): imported, and asked for by a request's model field
    (gRPC and HTTP) and by the openai client's models.retrieve, GET /v1/models/acme/tiny-llama, which the
    router's `/v1/models/{model}` route did not match (404 Not Found, aiohttp's, for a model it serves)."""
    import openai

    from tierline import InferenceClient
    from tierline_infra.supervisor import Stack

    name = "acme/tiny-llama"
    src, out = llama_checkpoint(tmp_path / "src", shard=False), tmp_path / "out"
    proc = run_cli("models", "import", str(src), "--out", str(out), "--name", name, "--device-context", "32",
                   "--device-ratio", "0.6", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["model_name"] == name
    overrides = {"router.device_complexity": 0.0, "router.cloud_complexity": 1.0,
                 "router.confidence_threshold": {"edge": 0.0}}
    with Stack(out, tiers=("edge",), overrides=overrides) as stack:
        client = openai.OpenAI(api_key="unused", base_url=stack.http_base_url, max_retries=0, timeout=60)
        assert client.models.retrieve(name).id == name
        assert [m.id for m in client.models.list().data] == [name]
        assert client.completions.create(model=name, prompt="The quick", max_tokens=4).choices[0].finish_reason
        with InferenceClient(None, name, stack.router_address) as grpc_client:
            assert grpc_client.infer("The quick", {"max_tokens": 4}).text is not None
        with pytest.raises(openai.NotFoundError) as other:  # a name that is not this one is still a 404
            client.models.retrieve("acme/other")
        assert other.value.body["code"] == "model_not_found" and '"acme/other"' in other.value.body["message"]
        # why the rule refuses '?': the client sends the name as it is, and the server sees only what is before it
        with pytest.raises(openai.NotFoundError, match='"acme" does not exist here'):
            client.models.retrieve("acme?tiny-llama")
