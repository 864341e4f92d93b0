"""Chat templates: a conversation rendered to the prompt text the model was trained on.

A template is Jinja, as in Hugging Face's `tokenizer_config.json` (`chat_template`): it sees
`messages` (each a role and its content), `add_generation_prompt`, and the tokenizer's
`bos_token` and `eos_token`; it may call `raise_exception(message)` to refuse a conversation.
It runs in Jinja's immutable sandbox, as transformers runs it: a template cannot reach Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


class TemplateError(ValueError):
    """The template refused the conversation, or failed while rendering it."""


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template and the special tokens it is rendered with."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for `messages`, ending where the assistant's answer begins."""
        try:
            return compile_template(self.source).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError:
            raise
        except Exception as error:  # Jinja's own errors, from a template we did not write
            raise TemplateError(f"the chat template failed: {error}") from None


@lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The Jinja template for `source` (ValueError if it does not parse)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    environment.globals["raise_exception"] = _refuse
    environment.filters["tojson"] = _to_json
    try:
        return environment.from_string(source)
    except TemplateSyntaxError as error:
        raise ValueError(f"line {error.lineno}: {error.message}") from None


def _refuse(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _to_json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)
