"""Tokenizer, special tokens, chat template and generation defaults of a checkpoint directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class ChatTemplateError(ValueError):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


@dataclass
class ModelTokenizer:
    tokenizer: Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: frozenset[int] = frozenset()
    chat_template: str | None = None
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelTokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        tok = Tokenizer.from_file(str(path))
        cfg = _read_json(model_dir / "tokenizer_config.json")
        gen = _read_json(model_dir / "generation_config.json")
        model_cfg = _read_json(model_dir / "config.json")
        template_file = model_dir / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        eos_token = _token_text(cfg.get("eos_token"))
        eos_ids: set[int] = set()
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            if source is not None:
                eos_ids.update(source if isinstance(source, list) else [source])
                break
        if eos_token is not None and tok.token_to_id(eos_token) is not None:
            eos_ids.add(tok.token_to_id(eos_token))
        defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k") if k in gen}
        return cls(
            tokenizer=tok,
            bos_token=_token_text(cfg.get("bos_token")),
            eos_token=eos_token,
            eos_token_ids=frozenset(eos_ids),
            chat_template=template,
            generation_defaults=defaults,
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages with the checkpoint's chat template in jinja2's immutable sandbox."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use /v1/completions")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # Templates write their own bos; the tokenizer must not add another.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
