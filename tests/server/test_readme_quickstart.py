"""The README's quick-start commands, run as written against a live server (URL and model swapped)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def localise(text: str, server) -> str:
    return text.replace("http://127.0.0.1:8000", server.url).replace("demo-small", "demo-tiny")


def test_readme_curl_examples_work(server):
    curl_block = next(b for b in blocks("") if b.lstrip().startswith("curl"))
    commands = [c.strip() for c in curl_block.replace("\\\n", " ").split("\n\n") if c.strip()]
    assert len(commands) == 2
    completion = subprocess.run(["bash", "-c", localise(commands[0], server)], capture_output=True, text=True,
                                check=True, timeout=60)
    assert json.loads(completion.stdout)["usage"]["completion_tokens"] == 16
    stream = subprocess.run(["bash", "-c", localise(commands[1], server)], capture_output=True, text=True,
                            check=True, timeout=60)
    assert stream.stdout.strip().endswith("data: [DONE]")


def test_readme_openai_sdk_example_works(server):
    code = localise(blocks("python")[0], server)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "completion_tokens=16" in out.stdout


def test_readme_set_up_commands_are_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README.read_text() and "make serve" in README.read_text()


def test_readme_client_example_works(server):
    code = localise(blocks("python")[1], server)
    assert "from coserve.clients import Client" in code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("['demo-tiny']")
