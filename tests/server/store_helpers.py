"""Helpers for the adapter-store tests: uploads over real HTTP, keys files, a peft reference."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import yaml
from tokenizers import Tokenizer

from tests.adapters.test_mixed_batch_vs_peft import peft_reference

PROMPT = [5, 17, 42, 99, 7]


def write_keys(path: Path, keys: dict[str, tuple[str, str]], rates: dict[str, float] | None = None) -> Path:
    """{key: (tenant, role)} -> a keys file (rates: {key: rps})."""
    entries = [{"key": k, "tenant": t, "role": r, **({"rate_limit_rps": rates[k]} if rates and k in rates else {})}
               for k, (t, r) in keys.items()]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def upload(url: str, key: str | None, name: str, adapter_dir: Path, **fields) -> httpx.Response:
    files = [(n, (n, (adapter_dir / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    return httpx.post(url + "/v1/adapters", data={"name": name, **fields}, files=files, headers=auth(key),
                      timeout=60)


def upload_files(url: str, key: str | None, name: str, files: dict[str, bytes], **fields) -> httpx.Response:
    parts = [(n, (n, data)) for n, data in files.items()]
    return httpx.post(url + "/v1/adapters", data={"name": name, **fields}, files=parts, headers=auth(key),
                      timeout=60)


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def complete(url: str, key: str | None, model: str, max_tokens: int = 24) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, headers=auth(key), timeout=120)


def completion_text(url: str, key: str | None, model: str) -> str:
    resp = complete(url, key, model)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["text"]


def peft_text(base_dir: Path, adapter_dir: Path | None) -> str:
    """What transformers + peft generate greedily for PROMPT, decoded like the server decodes."""
    tokens, _ = peft_reference(base_dir, adapter_dir, PROMPT)
    return Tokenizer.from_file(str(base_dir / "tokenizer.json")).decode(tokens)


def tar_gz(members: dict[str, bytes], link: str | None = None) -> bytes:
    """A .tar.gz with these exact member names (unsafe ones included), plus a symlink `link` if given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(info)
    return buffer.getvalue()


def extract_tar(raw: bytes, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tf:
        tf.extractall(into, filter="data")
        folder = tf.getnames()[0].split("/")[0]
    return into / folder
