"""PEFT directories as archives, read and written in memory (never extracted to disk).

Reading takes a .tar.gz / .tgz / .tar / .zip of a PEFT directory (files at the top or in one
folder) and returns its adapter_config.json and adapter_model.safetensors bytes. Caps: the
number of members and the uncompressed size; refused: absolute paths, `..`, links and device
files, pickled weights (adapter_model.bin), duplicates.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from coserve.adapters.types import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
MAX_MEMBERS = 32


@dataclass
class PeftFiles:
    config: bytes  # adapter_config.json
    weights: bytes  # adapter_model.safetensors


def _check_member_name(name: str) -> str:
    path = PurePosixPath(name.replace("\\", "/"))
    parts = path.parts
    if not parts or path.is_absolute() or ".." in parts or parts[0].endswith(":"):
        raise AdapterError(f"archive member {name!r} has an absolute or parent path", "archive")
    return path.name


def _pick(members: dict[str, bytes]) -> PeftFiles:
    pickles = [n for n in members if n in PICKLE_FILES]
    if WEIGHTS_FILE not in members:
        reason = f" ({pickles[0]} is a pickle and is never loaded)" if pickles else ""
        raise AdapterError(f"the archive has no {WEIGHTS_FILE}{reason}", WEIGHTS_FILE)
    if CONFIG_FILE not in members:
        raise AdapterError(f"the archive has no {CONFIG_FILE}", CONFIG_FILE)
    return PeftFiles(members[CONFIG_FILE], members[WEIGHTS_FILE])


def read_archive(raw: bytes, filename: str, max_bytes: int) -> PeftFiles:
    """Archive bytes -> the two PEFT files, within the caps."""
    members: dict[str, bytes] = {}
    total = count = 0

    def add(name: str, read, size: int) -> None:
        nonlocal total, count
        base = _check_member_name(name)
        count += 1
        if count > MAX_MEMBERS:
            raise AdapterError(f"the archive has more than {MAX_MEMBERS} files", "archive")
        total += size
        if total > max_bytes:
            raise AdapterError(f"the archive unpacks to more than {max_bytes} bytes", "archive")
        if base in (CONFIG_FILE, WEIGHTS_FILE):
            if base in members:
                raise AdapterError(f"the archive holds {base} twice", "archive")
            data = read()
            if len(data) != size:
                raise AdapterError(f"archive member {name!r} is truncated", "archive")
            members[base] = data
        elif base in PICKLE_FILES:
            members[base] = b""  # noted, never read

    lower = filename.lower()
    try:
        if lower.endswith(".zip") or raw[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise AdapterError(f"archive member {info.filename!r} is a link", "archive")
                    add(info.filename, lambda info=info: zf.read(info), info.file_size)
        else:
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tf:
                for info in tf:
                    if info.isdir():
                        continue
                    if not info.isfile():
                        raise AdapterError(f"archive member {info.name!r} is a link or device", "archive")
                    add(info.name, lambda info=info: tf.extractfile(info).read(), info.size)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise AdapterError(f"{filename or 'the archive'} is not a readable .tar.gz or .zip: {exc}",
                           "archive") from exc
    return _pick(members)


def write_tar_gz(files: dict[str, bytes], folder: str) -> bytes:
    """{file name: bytes} -> a .tar.gz with the files in `folder/` (what PeftModel.from_pretrained loads)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
