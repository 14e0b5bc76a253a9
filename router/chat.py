"""A conversation as the served model's prompt: the model's own chat template (Hugging Face's chat_template).

The template comes from the cloud tier's tokenizer_config.json in the models directory (what transformers'
`apply_chat_template` would use); a family without one (no tokenizer_config.json, or no chat_template in it)
uses the family's own format (tierline_shared.models.tokenizer.CHAT_TEMPLATE). Templates run in jinja2's sandbox,
as transformers runs them.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from jinja2 import TemplateError

from tierline_shared.models.artifacts import load_index, tier_entry
from tierline_shared.models.tokenizer import CHAT_TEMPLATE

TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The template refused a conversation (raise_exception) or failed on it: the client's 400."""


class ChatTemplate:
    def __init__(self, source: str, where: str = "the family's default"):
        self.source, self.where = source, where

    @classmethod
    def of_models(cls, models_dir: str | Path) -> "ChatTemplate":
        """The cloud tier's template, if its checkpoint has one; else the family's default."""
        models_dir = Path(models_dir)
        try:
            cloud = models_dir / tier_entry(load_index(models_dir), "cloud", models_dir)["config"]["path"]
        except (ValueError, KeyError):
            return cls(CHAT_TEMPLATE)
        path = cloud.parent / TOKENIZER_CONFIG
        if not path.is_file():
            return cls(CHAT_TEMPLATE)
        try:
            template = json.loads(path.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a readable tokenizer config ({exc})") from None
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return cls(template, str(path)) if isinstance(template, str) else cls(CHAT_TEMPLATE)

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
            return self._compiled.render(messages=messages, add_generation_prompt=True)
        except TemplateError as exc:  # the template refuses this conversation (or cannot render it)
            raise ChatTemplateError(f"the model's chat template ({self.where}) refused the messages: {exc}") from None
