"""Incremental detokenization and stop strings against whole-text decoding."""

from __future__ import annotations

import pytest

from coserve.engine.detokenizer import IncrementalDetokenizer
from coserve.engine.tokenizer import ChatTemplateError, ModelTokenizer

TEXT = "def naïve(x):\n    return x * 2  # ünïcödé → 漢字 ok\n"


@pytest.fixture(scope="module")
def tok(demo_tiny):
    return ModelTokenizer.from_dir(demo_tiny)


def test_incremental_text_equals_full_decode(tok):
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok)
    pieces = []
    for token in ids:
        detok.add(token)
        pieces.append(detok.take(final=False))
    pieces.append(detok.take(final=True))
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("stop", ["return", "→", "x * 2", "\n"])
def test_stop_string_truncates_and_is_never_sent(tok, stop):
    ids = tok.encode(TEXT)
    detok = IncrementalDetokenizer(tok, (stop, "never-there"))
    sent = ""
    for token in ids:
        detok.add(token)
        sent += detok.take(final=False)
        if detok.stopped:
            break
    sent += detok.take(final=True)
    assert detok.stopped
    assert sent == TEXT[: TEXT.index(stop)]


def test_chat_template_renders_in_sandbox(tok):
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok2 = ModelTokenizer(tok.tokenizer, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        tok2.render_chat([{"role": "user", "content": "x"}])
