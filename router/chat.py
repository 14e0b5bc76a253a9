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
    read_checkpoint_specials,
    special_tokens,
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the template here, not in tokenizer_config.json


class ChatTemplateError(ValueError):
    """The template refused a conversation (raise_exception) or failed on it: the client's 400."""


class ChatTemplate:
    def __init__(self, source: str, where: str = "the family's default", tokens: dict[str, str] | None = None,
                 tiers_add_bos: bool = True):
        self.source, self.where = source, where
        # the special tokens the template may name: bos_token, eos_token, ... (none given: the family's own)
        self.tokens = FAMILY_SPECIALS if tokens is None else tokens
        # the BOS the tiers' tokenizer puts before every prompt itself (`prompt` leaves it to them)
        self._bos = (self.tokens.get("bos_token") or "") if tiers_add_bos else ""

    @classmethod
    def of_models(cls, models_dir: str | Path) -> "ChatTemplate":
        """The cloud tier's template, if its checkpoint has one; else the family's default."""
        models_dir = Path(models_dir)
        try:
            index = load_index(models_dir)
            entry = tier_entry(index, "cloud", models_dir)
            cloud = models_dir / entry["config"]["path"]
        except (ValueError, KeyError):
            return cls(CHAT_TEMPLATE)
        adds = _tiers_add_bos(models_dir, index)
        path, jinja = cloud.parent / TOKENIZER_CONFIG_FILE, cloud.parent / CHAT_TEMPLATE_FILE
        if "chat_template" in entry:  # listed with its sha256 (tierline import): checked as the weights are
            verify_file(models_dir, entry["chat_template"])
        config, _ = read_checkpoint_specials(cloud.parent)  # special_tokens_map.json's tokens too, as transformers
        tokens = special_tokens(config)
        if jinja.is_file():  # as transformers: the file wins over tokenizer_config.json's chat_template
            return cls(jinja.read_text(), str(jinja), tokens, adds)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        # no template: the family's format, with the checkpoint's own special tokens
        return cls(template if isinstance(template, str) else CHAT_TEMPLATE, str(path), tokens, adds)

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
        """What the router sends for `messages`: the rendered text, less a leading BOS the tiers' tokenizer adds
        itself. A template that writes `{{ bos_token }}` (Llama's, Mistral's, the family's) then reaches the model
        with one BOS, as transformers' apply_chat_template(tokenize=True) gives it, not two; a tier or an upstream
        engine that does not know of chat templates adds it as it does to every prompt."""
        text = self.render(messages)
        return text[len(self._bos):] if self._bos and text.startswith(self._bos) else text


def _tiers_add_bos(models_dir: Path, index: dict) -> bool:
    """Whether the tokenizer every tier encodes prompts with puts a BOS first (an index that lists none: the
    family's, which does)."""
    if "tokenizer" not in index.get("artifacts", {}):
        return True
    try:
        return load_tokenizer(models_dir, index).add_bos
    except (ArtifactError, OSError):  # the tiers will say what is wrong with it; the router serves on
        return True
