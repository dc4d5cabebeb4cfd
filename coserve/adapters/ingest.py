"""Between PEFT files and the store: validate-then-encode an upload, fetch-decode-validate a record.

`prepare` runs every check of peft_format against the base model before anything is stored,
so a refused upload leaves no trace. `load_record` is the host-tier source of a stored
adapter: it fetches the revision's bytes, decodes its codec and builds the LoadedAdapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from coserve.adapters import codecs
from coserve.adapters.archive import PeftFiles
from coserve.adapters.peft_format import build_adapter, parse_config, parse_tensors
from coserve.adapters.store import AdapterRecord, AdapterStore, sha256_hex
from coserve.adapters.types import AdapterError, BaseModelShape, LoadedAdapter


@dataclass
class PreparedUpload:
    config: bytes
    stored: bytes  # what goes to Redis (the uploaded safetensors, or their ComPEFT form)
    original_bytes: int
    sha256: str
    method: str
    rank: int
    codec: str


def prepare(files: PeftFiles, name: str, base: BaseModelShape, max_rank: int, codec: str = "none",
            density: float = 0.1) -> PreparedUpload:
    """Validate an upload fully against the base model; raise AdapterError naming the field or tensor."""
    if codec not in codecs.CODECS:
        raise AdapterError(f"codec must be one of {list(codecs.CODECS)}", "codec")
    config = parse_config(files.config)
    tensors = parse_tensors(files.weights)
    adapter = build_adapter(name, config, tensors, base, max_rank)
    if codec != "none" and adapter.method not in ("LORA", "DORA"):
        raise AdapterError(f"the {codec} codec applies to LoRA/DoRA adapters, not {adapter.method}", "codec")
    stored = codecs.encode(codec, files.weights, tensors, density)
    return PreparedUpload(files.config, stored, len(files.weights), sha256_hex(files.weights), adapter.method,
                          adapter.rank, codec)


def peft_files(store: AdapterStore, record: AdapterRecord) -> PeftFiles:
    """The record as a PEFT directory's two files (dense weights, whatever the codec)."""
    stored = store.blob(record.revision)
    if stored is None:
        raise AdapterError(f"adapter {record.name} version {record.version} is no longer stored", "model")
    return PeftFiles(record.config.encode(), codecs.decode(record.codec, stored))


def record_source(store: AdapterStore, record: AdapterRecord, base: BaseModelShape, max_rank: int,
                  on_fetch: Callable[[float], None] | None = None) -> Callable[[], LoadedAdapter]:
    """The host-cache source of a stored adapter (called on the adapter-load thread)."""
    def load() -> LoadedAdapter:
        start = time.perf_counter()
        files = peft_files(store, record)
        if on_fetch is not None:
            on_fetch(time.perf_counter() - start)
        config = parse_config(files.config)
        return build_adapter(record.name, config, parse_tensors(files.weights), base, max_rank)

    return load
