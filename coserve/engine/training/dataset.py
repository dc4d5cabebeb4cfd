"""Fine-tuning files: JSONL validation (with line numbers) and tokenisation into TrainSamples.

Two example forms, one per line:
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
      loss on the assistant turns (their content and the template's end-of-turn text);
  {"prompt": str, "completion": str}
      the prompt tokenised as /v1/completions does, then the completion and eos; loss on those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from coserve.engine.tokenizer import ModelTokenizer
from coserve.engine.training.trainer import TrainSample

ROLES = ("system", "user", "assistant", "developer")
MAX_EXAMPLES = 100_000


class DatasetError(ValueError):
    def __init__(self, message: str, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass
class Example:
    line: int
    body: dict[str, Any]


def _check_example(body: Any, line: int) -> None:
    if not isinstance(body, dict):
        raise DatasetError("each line must be a JSON object", line)
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise DatasetError("`messages` must be a non-empty list", line)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DatasetError(f"messages[{i}].role must be one of {list(ROLES)}", line)
            if not isinstance(m.get("content"), str):
                raise DatasetError(f"messages[{i}].content must be a string", line)
        if not any(m["role"] == "assistant" for m in messages):
            raise DatasetError("the conversation has no assistant message to learn", line)
    elif "prompt" in body or "completion" in body:
        for key in ("prompt", "completion"):
            if not isinstance(body.get(key), str):
                raise DatasetError(f"`{key}` must be a string", line)
        if not body["completion"]:
            raise DatasetError("`completion` is empty: nothing to learn", line)
    else:
        raise DatasetError("an example needs `messages`, or `prompt` and `completion`", line)


def parse_jsonl(data: bytes) -> list[Example]:
    """Every non-blank line as a checked example; the first fault raises DatasetError with its line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"the file is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    examples = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not valid JSON ({exc.msg} at column {exc.colno})", number) from None
        _check_example(body, number)
        examples.append(Example(number, body))
        if len(examples) > MAX_EXAMPLES:
            raise DatasetError(f"more than {MAX_EXAMPLES} examples", number)
    if not examples:
        raise DatasetError("the file holds no examples")
    return examples


def tokenize(tokenizer: ModelTokenizer, example: Example, eos_id: int | None, max_len: int) -> TrainSample:
    """One example -> token ids and loss mask, truncated to max_len tokens."""
    body = example.body
    if "messages" in body:
        ids, mask = _chat(tokenizer, body["messages"], example.line)
    else:
        prompt = tokenizer.encode(body["prompt"])
        completion = tokenizer.encode(body["completion"], add_special_tokens=False)
        completion += [eos_id] if eos_id is not None else []
        ids, mask = prompt + completion, [False] * len(prompt) + [True] * len(completion)
    return TrainSample(ids[:max_len], mask[:max_len])


def _chat(tokenizer: ModelTokenizer, messages: list[dict], line: int) -> tuple[list[int], list[bool]]:
    text = tokenizer.render_chat(messages, add_generation_prompt=False)
    spans = []  # character spans of assistant turns in `text`
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DatasetError("the model's chat template does not render conversations incrementally; "
                               "use prompt/completion examples", line)
        spans.append((len(before), len(through)))
    encoding = tokenizer.tokenizer.encode(text, add_special_tokens=False)
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in encoding.offsets]
    return list(encoding.ids), mask
