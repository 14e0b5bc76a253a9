"""A conversation as the served model's prompt: the model's own chat template (Hugging Face's chat_template).

The template comes from the cloud tier's checkpoint in the models directory, where transformers'
`apply_chat_template` would find it: chat_template.jinja (transformers 5 saves it there), else the
chat_template of tokenizer_config.json; a family without one uses the family's own format
(tierline_shared.models.tokenizer.CHAT_TEMPLATE). Templates run in jinja2's sandbox with the special tokens
(`bos_token`, `eos_token`, ...) as transformers' AutoTokenizer reads them (tokenizer_config.json, and
special_tokens_map.json where older checkpoints keep them), as transformers runs them.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from jinja2 import TemplateError

from tierline_shared.models.artifacts import ArtifactError, load_index, load_tokenizer, tier_entry, verify_file
from tierline_shared.models.tokenizer import (
    CHAT_TEMPLATE,
    FAMILY_SPECIALS,
    TOKENIZER_CONFIG_FILE,
    TextTokenizer,
    read_checkpoint_specials,
    special_tokens,
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template here, not in tokenizer_config.json
# of a rendered conversation, the characters `ChatTemplate.request` encodes to choose what to send: every chat
# request pays it on the router's event loop, before its key and size are checked, so it is bounded
CHECKED_CHARS = 256


class ChatTemplateError(ValueError):
    """The template refused a conversation (raise_exception) or failed on it: the client's 400."""


class ChatTemplate:
    def __init__(self, source: str, where: str = "the family's default", tokens: dict[str, str] | None = None,
                 tiers_add_bos: bool = True, tokenizer: TextTokenizer | None = None):
        """`tiers_add_bos`: the tiers' tokenizer puts a BOS before every prompt (`request` leaves a template's to
        it); `tokenizer`: that tokenizer, when the router can read it and every tier encodes with it (not an
        upstream engine): `request` then gives the tiers the ids transformers gives, whatever the tokenizer."""
        self.source, self.where = source, where
        # the special tokens the template may name: bos_token, eos_token, ... (none given: the family's own)
        self.tokens = FAMILY_SPECIALS if tokens is None else tokens
        # the BOS the tiers' tokenizer puts before every prompt itself (`request` leaves it to them)
        self._bos = (self.tokens.get("bos_token") or "") if tiers_add_bos else ""
        self._tokenizer = tokenizer

    @classmethod
    def of_models(cls, models_dir: str | Path, tiers_tokenize: bool = True) -> "ChatTemplate":
        """The cloud tier's template, if its checkpoint has one; else the family's default. `tiers_tokenize`:
        every tier encodes prompts with the models directory's tokenizer (not so when the cloud forwards to an
        upstream engine: tiers.cloud.upstream)."""
        models_dir = Path(models_dir)
        try:
            index = load_index(models_dir)
            entry = tier_entry(index, "cloud", models_dir)
            cloud = models_dir / entry["config"]["path"]
        except (ValueError, KeyError):
            return cls(CHAT_TEMPLATE)
        tokenizer = _tiers_tokenizer(models_dir, index)
        adds = tokenizer is None or tokenizer.add_bos
        tokenizer = tokenizer if tiers_tokenize else None
        path, jinja = cloud.parent / TOKENIZER_CONFIG_FILE, cloud.parent / CHAT_TEMPLATE_FILE
        if "chat_template" in entry:  # listed with its sha256 (tierline import): checked as the weights are
            verify_file(models_dir, entry["chat_template"])
        config, _ = read_checkpoint_specials(cloud.parent)  # special_tokens_map.json's tokens too, as transformers
        tokens = special_tokens(config)
        if jinja.is_file():  # as transformers: the file wins over tokenizer_config.json's chat_template
            return cls(jinja.read_text(), str(jinja), tokens, adds, tokenizer)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        # no template: the family's format, with the checkpoint's own special tokens
        return cls(template if isinstance(template, str) else CHAT_TEMPLATE, str(path), tokens, adds, tokenizer)

    @cached_property
    def _compiled(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):  # what Hugging Face templates call to refuse a conversation
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source)

    def render(self, messages: list[dict]) -> str:
        """The prompt for `messages` ({"role", "content"} with text content), ready for the model to answer."""
        try:
            return self._compiled.render(**self.tokens, messages=messages, add_generation_prompt=True)
        except TemplateError as exc:  # the template refuses this conversation (or cannot render it)
            raise ChatTemplateError(f"the model's chat template ({self.where}) refused the messages: {exc}") from None

    def prompt(self, messages: list[dict]) -> str:
        """The prompt text `request` sends for `messages`."""
        return self.request(messages)[0]

    def request(self, messages: list[dict]) -> tuple[str, bool]:
        """What the router sends for `messages`: (prompt, add_special_tokens), such that the tiers read the ids
        transformers' apply_chat_template(tokenize=True) gives (the rendered text, no special token added).

        The rendered text less a leading BOS the tiers' tokenizer adds itself, when that gives those ids (a
        template that writes `{{ bos_token }}`, Llama's, Mistral's, the family's, would otherwise reach the model
        with two), and a plain prompt (old tiers, upstream engines and the routing scorer see one); else, when the
        tokenizer is known, the rendered text with add_special_tokens false: a Metaspace tokenizer that marks only
        the text's first word (`prepend_scheme: first`) encodes it differently after a BOS than at the start, and a
        template without `{{ bos_token }}` gets none from a tokenizer that would add one."""
        text = self.render(messages)
        plain = text[len(self._bos):] if self._bos and text.startswith(self._bos) else text
        tok = self._tokenizer
        # the two encodings can differ only at the start (a BOS, the first word's mark): their first
        # CHECKED_CHARS characters of the conversation say it, at a cost that does not grow with the body
        cut = len(text) - len(plain) + CHECKED_CHARS
        if tok is None or tok.encode(plain[:CHECKED_CHARS]) == tok.encode(text[:cut], bos=False):
            return plain, True
        return text, False


def _tiers_tokenizer(models_dir: Path, index: dict) -> TextTokenizer | None:
    """The tokenizer every tier encodes prompts with; None when the index lists none (the family's, which adds a
    BOS) or it cannot be read (the tiers will say what is wrong with it; the router serves on)."""
    if "tokenizer" not in index.get("artifacts", {}):
        return None
    try:
        return load_tokenizer(models_dir, index)
    except (ArtifactError, OSError):
        return None
