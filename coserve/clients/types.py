"""Typed results of the coserve client: small dataclasses over the server's JSON (`raw` keeps it all)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


class CoserveError(Exception):
    """An error answer: HTTP status and the server's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None):
        super().__init__(f"{status}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.message, self.type, self.param = status, message, type_, param


@dataclass
class _Object:
    raw: dict = field(repr=False)

    @classmethod
    def of(cls, body: dict):
        known = {f.name for f in fields(cls)} - {"raw"}
        return cls(raw=body, **{k: body.get(k) for k in known})


@dataclass
class Model(_Object):
    id: str = ""
    parent: str | None = None
    owned_by: str | None = None
    max_model_len: int | None = None


@dataclass
class Adapter(_Object):
    id: str = ""
    version: int | None = None
    method: str | None = None
    rank: int | None = None
    codec: str | None = None
    original_bytes: int | None = None
    stored_bytes: int | None = None
    created: float | None = None


@dataclass
class FileObject(_Object):
    id: str = ""
    filename: str | None = None
    bytes: int | None = None
    purpose: str | None = None
    examples: int | None = None
    created_at: int | None = None


@dataclass
class Job(_Object):
    id: str = ""
    status: str = ""
    model: str | None = None
    fine_tuned_model: str | None = None
    training_file: str | None = None
    trained_tokens: int | None = None
    hyperparameters: dict | None = None
    error: dict | None = None
    created_at: int | None = None
    finished_at: int | None = None
    module_selection: dict | None = None  # target_modules "auto": the probe's ranking

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


@dataclass
class Event(_Object):
    id: str = ""
    created_at: int | None = None
    level: str | None = None
    message: str = ""
    type: str | None = None
    data: dict | None = None


@dataclass
class Completion(_Object):
    """A completion or chat completion: `text` is the first choice's text or message content."""

    id: str = ""
    model: str | None = None
    usage: dict | None = None
    text: str = ""
    finish_reason: str | None = None

    @classmethod
    def of(cls, body: dict) -> Completion:
        choice = (body.get("choices") or [{}])[0]
        text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
        return cls(raw=body, id=body.get("id", ""), model=body.get("model"), usage=body.get("usage"),
                   text=text or "", finish_reason=choice.get("finish_reason"))


@dataclass
class Chunk(_Object):
    """One streamed piece: `text` is the new text of the first choice ('' for the usage chunk)."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None

    @classmethod
    def of(cls, body: dict) -> Chunk:
        choices = body.get("choices") or []
        choice = choices[0] if choices else {}
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        return cls(raw=body, text=text or "", finish_reason=choice.get("finish_reason"), usage=body.get("usage"))


def job_progress(events: list[Event]) -> tuple[int, int] | None:
    """(step, total steps) from the newest metrics event, if any."""
    for event in events:  # newest first, as the server lists them
        data = event.data or {}
        if event.type == "metrics" and "total_steps" in data:
            return int(data["step"]), int(data["total_steps"])
    return None


def error_from(status: int, body: Any) -> CoserveError:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return CoserveError(status, str(error.get("message")), error.get("type"), error.get("param"))
    return CoserveError(status, str(body)[:500])
