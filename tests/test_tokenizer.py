"""The shared tokenizer: numbers and the benchmark's words are whole tokens, any text round-trips."""

import pytest
import torch

from tierline.build.pipeline import family
from tierline.build.train import add_token_factors, bake_token_factors
from tierline_shared.models.llama import Decoder
from tierline_shared.models.tokenizer import TextTokenizer, build_tokenizer
from tierline_shared.tasks.problems import generate

TOK = TextTokenizer.default()


def pieces(text: str) -> list[str]:
    return [TOK.decode([i]) for i in TOK.encode(text, bos=False)]


def test_numbers_up_to_99_are_one_token_longer_ones_split():
    assert pieces("12+7=19") == ["12", "+", "7", "=", "19"]
    assert pieces("max(28,5)") == ["max", "(", "28", ",", "5", ")"]
    assert pieces("123") == ["12", "3"]
    assert pieces("05") == ["0", "5"]  # a leading zero is not how numbers are written


def test_words_keep_their_leading_space_and_only_whole_words_match():
    assert pieces("Ann has 12 apples.") == ["Ann", " has", " ", "12", " apples", "."]
    assert pieces("Tomato") == list("Tomato")  # `Tom` followed by a letter is not the name


@pytest.mark.parametrize("text", ["Q:Ann has 12 apples. How many apples has Ann?\nA:", "x" * 40 + " 999 (a,b)!",
                                  "min(3,99)=?", "  two  spaces\n"])
def test_every_text_in_the_alphabet_round_trips(text):
    ids = TOK.encode(text)
    assert TOK.unknown_count(text) == 0
    assert TOK.decode(ids) == text


def test_benchmark_problems_round_trip_in_fewer_tokens_than_characters():
    tokens = chars = 0
    for p in generate("test", 200, seed=0):
        ids = TOK.encode(p.text, bos=False)
        assert TOK.decode(ids) == p.text
        assert len(ids) <= len(p.text)
        tokens, chars = tokens + len(ids), chars + len(p.text)
    assert tokens < 0.75 * chars


def test_variable_facts_start_with_one_token():
    assert pieces("r:16;e:3+4") == ["r:", "16", ";", "e:", "3", "+", "4"]
    assert pieces("r?16+4=20") == ["r?", "16", "+", "4", "=", "20"]  # reading a fact is another token
    assert pieces("Q:r=?") == ["Q", ":", "r", "=", "?"]
    assert pieces("Q:x=?\nA:") == ["Q", ":", "x", "=", "?", "\n", "A", ":"]  # capitals stay characters


def test_characters_outside_the_alphabet_are_unknown():
    assert TOK.unknown_count("héllo") == 1


def test_a_prompt_checked_at_the_door_is_not_tokenized_again_to_be_run():
    """Validation counts unknown characters on the encoding the engine runs (<bos> first): one encode."""
    tok = TextTokenizer.default()
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def encode(self, *args, **kwargs):
            calls.append(args[0])
            return self.inner.encode(*args, **kwargs)

    tok._tok = Counting(tok._tok)
    prompt = "Q:Ann has 12 apples. How many apples has Ann?\nA:"
    assert tok.unknown_count(prompt) == 0
    assert tok.encode(prompt)[0] == tok.bos_id
    assert calls == [prompt]


def test_number_ids_cover_every_number_token():
    ids = TOK.number_ids()
    assert sorted(set(ids.values())) == list(range(100))
    assert all(TOK.decode([i]) == str(n) for i, n in ids.items())
    assert TextTokenizer(build_tokenizer("0123456789", words=(), numbers=False)).number_ids() == {
        i + 4: i for i in range(10)}  # the four special tokens come first


def test_shared_parts_tie_digits_letters_and_words():
    parts = TOK.shared_parts()
    ids = {TOK.decode([i]): i for i in parts}
    assert parts[ids["47"]] == ("tens:4", "units:7") and parts[ids["7"]] == ("tens:0", "units:7")
    assert parts[ids["p"]] == parts[ids["p:"]] == parts[ids["p?"]] == ("letter:p",)
    assert parts[ids["Tom"]] == parts[ids[" Tom"]] == ("word:Tom",)
    assert not {"+", "=", ";", "#"} & set(ids)  # operators share nothing


def test_token_factors_are_baked_into_a_plain_model():
    tok = TOK
    torch.manual_seed(0)
    model = Decoder(family("tiny").teacher)
    add_token_factors(model, tok)
    factors = model.model.embed_tokens.parametrizations.weight[0]
    with torch.no_grad():  # as if trained: tied tokens share part of their rows
        factors.F.normal_()
        model.lm_head.parametrizations.weight[0].F.normal_()
    plain = model.model.embed_tokens.parametrizations.weight.original.detach().clone()
    F, P = factors.F.detach().clone(), factors.P
    x = torch.tensor([tok.encode("Q:p=12;q=p+7;q=?\nA:p=12;p:12;q=p+7;p?12+7=19")])
    before = model(x)[0]
    bake_token_factors(model)
    assert set(model.state_dict()) == set(Decoder(family("tiny").teacher).state_dict())  # plain weights again
    assert torch.allclose(model(x)[0], before, atol=1e-6)
    moved = model.model.embed_tokens.weight.detach() - plain
    ids = {tok.decode([i]): i for i in tok.shared_parts()}
    assert torch.allclose(moved[ids["47"]] - moved[ids["7"]], moved[ids["42"]] - moved[ids["2"]],
                          atol=1e-5)  # the tens part (float32 sums: not bit-equal)
    assert torch.allclose(moved[ids["p:"]], moved[ids["p?"]]) and torch.allclose(moved[ids["p"]], moved[ids["p:"]])
    assert torch.allclose(moved[tok.encode("+", bos=False)[0]], torch.zeros(F.shape[1]))
    assert P.sum(0).min() >= 2  # every part is shared by at least two tokens


# Llama-3's chat template (abridged): it names bos_token, which transformers' apply_chat_template provides
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_the_router_renders_a_saved_chat_template_as_transformers_does(tmp_path):
    """transformers 5 saves a tokenizer's chat template to chat_template.jinja (not tokenizer_config.json); the router
    reads it from the cloud checkpoint and gives the template the special tokens, as apply_chat_template does."""
    import json

    transformers = pytest.importorskip("transformers")
    from tierline_router.chat import ChatTemplate

    cloud = tmp_path / "cloud"
    TOK.save_pretrained(cloud)
    hf_tok = transformers.AutoTokenizer.from_pretrained(cloud, local_files_only=True)
    hf_tok.chat_template = LLAMA3_TEMPLATE
    hf_tok.save_pretrained(cloud)
    assert (cloud / "chat_template.jinja").is_file()
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": {"cloud": {"config": {
        "path": "cloud/config.json"}}}}))
    messages = [{"role": "user", "content": "2+3=?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "1+1=?"}]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert want.startswith("<bos><|start_header_id|>user")
    assert ChatTemplate.of_models(tmp_path).render(messages) == want


def test_a_chat_template_gets_the_special_tokens_an_older_checkpoint_keeps_in_special_tokens_map(tmp_path):
    """Older checkpoints name their special tokens in special_tokens_map.json, not tokenizer_config.json; transformers
    reads the map (unless tokenizer_config.json has added_tokens_decoder) and its apply_chat_template gives the
    template those tokens. The router's rendering of the same template is the same text (bos_token was "")."""
    import json

    transformers = pytest.importorskip("transformers")
    from tierline_router.chat import ChatTemplate

    cloud = tmp_path / "cloud"
    TOK.save_pretrained(cloud)
    config = json.loads((cloud / "tokenizer_config.json").read_text())
    moved = {k: config.pop(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}
    config.pop("added_tokens_decoder", None)
    config["chat_template"] = LLAMA3_TEMPLATE
    (cloud / "tokenizer_config.json").write_text(json.dumps(config))
    (cloud / "special_tokens_map.json").write_text(json.dumps(moved))
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": {"cloud": {"config": {
        "path": "cloud/config.json"}}}}))
    hf_tok = transformers.AutoTokenizer.from_pretrained(cloud, local_files_only=True)
    messages = [{"role": "user", "content": "2+3=?"}]
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert want.startswith("<bos><|start_header_id|>user")
    assert ChatTemplate.of_models(tmp_path).render(messages) == want


# Mistral Instruct v0.1/v0.2's template (abridged): the BOS, then plain text ([INST] is not a special token)
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def _metaspace_checkpoint(directory, template: str):
    """A sentencepiece-style fast tokenizer as today's converters write it (legacy: false): Metaspace with
    `prepend_scheme: first` marks only the text's first word with ▁, a BOS from the post-processor; saved with
    its chat template, and listed in a models index as `tierline models import` lists it."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tierline_shared.models.artifacts import sha256_of

    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    texts = ["[INST] What is two plus three? [/INST] Five.", "Hello there, how are you today?"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"]))
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                  unk_token="<unk>")
    hf_tok.chat_template = template
    cloud = directory / "cloud"
    hf_tok.save_pretrained(cloud)
    artifacts = {"cloud": {"config": {"path": "cloud/config.json"}}}
    for name, file in (("tokenizer", "tokenizer.json"), ("tokenizer_config", "tokenizer_config.json")):
        artifacts[name] = {"path": f"cloud/{file}", "sha256": sha256_of(cloud / file)}
    (directory / "manifest.json").write_text(json.dumps({"artifacts": artifacts}))
    return transformers.AutoTokenizer.from_pretrained(cloud, local_files_only=True)


@pytest.mark.parametrize("template", [INST_TEMPLATE, INST_TEMPLATE.removeprefix("{{ bos_token }}")])
def test_a_conversation_reaches_the_tiers_as_transformers_tokenizes_it_whatever_the_tokenizer(tmp_path, template):
    """A review found: leaving a template's BOS to the tiers' tokenizer (the router sends the text after it) is exact
    for byte-level BPE (Llama 3) and the legacy Prepend normalizer, not for a Metaspace tokenizer with
    `prepend_scheme: first` (Mistral Instruct v0.1/v0.2, Llama 2 converted with legacy: false): at the start of
    a prompt "[INST]" gets the ▁ that transformers, encoding it after the BOS, does not give it. Nor for a template
    without `{{ bos_token }}` whose tokenizer adds one (transformers gives the model none). The router now sends
    such a prompt whole, with add_special_tokens false: the tiers' ids are apply_chat_template(tokenize=True)'s."""
    from tierline_router.chat import ChatTemplate
    from tierline_shared.models.artifacts import load_tokenizer
    from tierline_shared.runtime.engine import prompt_ids

    hf_tok = _metaspace_checkpoint(tmp_path, template)
    tiers = load_tokenizer(tmp_path)  # what every tier encodes prompts with
    chat = ChatTemplate.of_models(tmp_path)
    for messages in ([{"role": "user", "content": "What is two plus three?"}],
                     [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                      {"role": "user", "content": "how are you?"}],
                     [{"role": "user", "content": "Hello there, how are you today? " * 40}]):  # past CHECKED_CHARS
        want = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        prompt, specials = chat.request(messages)
        assert prompt_ids(tiers, prompt, specials) == want, (prompt, specials)
        assert not specials and prompt == chat.render(messages)
        plain = prompt.removeprefix("<s>")
        assert tiers.encode(plain) != want  # what the router sent before: the BOS's text left to the tokenizer
        # a tier that forwards to an upstream engine tokenizes there: the prompt stays plain text
        assert ChatTemplate.of_models(tmp_path, tiers_tokenize=False).request(messages) == (plain, True)
