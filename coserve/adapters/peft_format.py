"""Read and validate a Hugging Face PEFT adapter: adapter_config.json + adapter_model.safetensors.

Everything is checked before anything is used: safetensors only (a pickle is refused and
never unpickled), allowlisted config keys, a supported peft_type, keys that map to modules of
the base model, shapes that match the base layer, ranks within the cap, float dtypes, no
NaN/Inf. Each failure raises AdapterError naming the field or tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from coserve.adapters import lora, road, shira
from coserve.adapters.types import (
    TARGET_MODULES,
    AdapterError,
    BaseModelShape,
    LoadedAdapter,
    ModuleDelta,
    module_path,
)

MAX_CONFIG_BYTES = 64 * 1024
MAX_SAFETENSORS_HEADER = 16 * 2**20
MAX_TENSORS = 100_000
METHODS = {"LORA": lora, "ROAD": road, "SHIRA": shira}
# Keys every PEFT config carries; each method module adds its own.
COMMON_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "target_modules", "modules_to_save", "exclude_modules", "layers_to_transform",
    "layers_pattern", "init_weights", "init_lora_weights", "fan_in_fan_out",
    "coserve_token_selection",  # TS-PEFT thresholds (coserve's; plain peft ignores the key)
}
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(" + "|".join(TARGET_MODULES) + r")\.(.+)$"
)


def parse_config(raw: bytes | str) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"adapter_config.json is larger than {MAX_CONFIG_BYTES} bytes", "adapter_config.json")
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter_config.json is not valid JSON: {exc}", "adapter_config.json") from exc
    if not isinstance(config, dict):
        raise AdapterError("adapter_config.json must hold a JSON object", "adapter_config.json")
    peft_type = config.get("peft_type")
    if peft_type not in METHODS:
        raise AdapterError(f"peft_type {peft_type!r} is not supported (supported: {sorted(METHODS)})", "peft_type")
    method = METHODS[peft_type]
    unknown = set(config) - COMMON_KEYS - method.CONFIG_KEYS
    if unknown:
        raise AdapterError(f"unsupported config keys: {sorted(unknown)}", sorted(unknown)[0])
    mapping = config.get("auto_mapping")
    if mapping and not str((mapping or {}).get("parent_library", "")).startswith("transformers."):
        raise AdapterError("auto_mapping names custom code outside transformers; coserve never runs it",
                           "auto_mapping")
    if config.get("modules_to_save"):
        raise AdapterError("modules_to_save (fully trained extra modules) cannot be served per request",
                           "modules_to_save")
    method.check_config(config)
    return config


def parse_tensors(raw: bytes) -> dict[str, torch.Tensor]:
    """Safetensors bytes -> tensors, after checking the header's size and tensor count."""
    if raw[:2] == b"\x80\x04" or raw[:2] == b"\x80\x02" or raw[:4] == b"PK\x03\x04":
        raise AdapterError("adapter weights are a pickle, not safetensors; coserve never unpickles",
                           "adapter_model.safetensors")
    if len(raw) < 8:
        raise AdapterError("adapter_model.safetensors is truncated", "adapter_model.safetensors")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > MAX_SAFETENSORS_HEADER or header_len > len(raw) - 8:
        raise AdapterError(f"safetensors header length {header_len} is invalid for {len(raw)} bytes",
                           "adapter_model.safetensors")
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"safetensors header is not JSON: {exc}", "adapter_model.safetensors") from exc
    if not isinstance(header, dict) or len(header) > MAX_TENSORS:
        raise AdapterError("safetensors header has too many entries", "adapter_model.safetensors")
    try:
        return load_safetensors_bytes(raw)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"malformed safetensors: {exc}", "adapter_model.safetensors") from exc


def build_adapter(
    name: str, config: dict[str, Any], tensors: dict[str, torch.Tensor], base: BaseModelShape, max_rank: int
) -> LoadedAdapter:
    """Group tensors per (layer, module), validate them against the base and convert to serving form."""
    method = METHODS[config["peft_type"]]
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match:
            raise AdapterError(f"tensor {key} does not map to a projection of the base model", key)
        layer, module, suffix = int(match.group(1)), match.group(2), match.group(3)
        if layer >= base.num_layers:
            raise AdapterError(f"tensor {key} targets layer {layer}; the base model has {base.num_layers}", key)
        if module not in base.module_shapes:
            raise AdapterError(f"tensor {key} targets {module}, which the base model lacks", key)
        grouped.setdefault((layer, module), {})[suffix] = tensor
    if not grouped:
        raise AdapterError("the adapter holds no tensors", "adapter_model.safetensors")
    layers = config.get("layers_to_transform")
    if layers is not None:
        allowed = {layers} if isinstance(layers, int) else set(layers)
        stray = sorted({layer for layer, _ in grouped} - allowed)
        if stray:
            raise AdapterError(f"tensors for layers {stray} outside layers_to_transform", "layers_to_transform")
    adapter = LoadedAdapter(name, method.method_name(config), config)
    for (layer, module), parts in sorted(grouped.items()):
        prefix = f"base_model.model.{module_path(layer, module)}"
        out_f, in_f = base.module_shapes[module]
        delta: ModuleDelta = method.parse_module(config, parts, prefix, module, out_f, in_f, max_rank)
        adapter.modules[layer, module] = delta
    if config.get("coserve_token_selection") is not None:
        _apply_thresholds(adapter, config["coserve_token_selection"])
    return adapter


def _apply_thresholds(adapter: LoadedAdapter, selection: Any) -> None:
    """coserve_token_selection = {"target_sparsity": q, "thresholds": {"model.layers.L.<group>.<module>": tau}}."""
    field = "coserve_token_selection"
    if not isinstance(selection, dict) or not isinstance(selection.get("thresholds"), dict):
        raise AdapterError(f"{field} must be an object with a `thresholds` object", field)
    thresholds = selection["thresholds"]
    paths = {module_path(layer, module): delta for (layer, module), delta in adapter.modules.items()}
    for path, tau in thresholds.items():
        if path not in paths:
            raise AdapterError(f"{field}.thresholds names {path}, which the adapter does not adapt", field)
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not 0 <= tau < float("inf"):
            raise AdapterError(f"{field}.thresholds[{path}] must be a finite number >= 0", field)
        paths[path].gate_tau = float(tau)


def load_adapter_dir(name: str, path: str | Path, base: BaseModelShape, max_rank: int) -> LoadedAdapter:
    """A PEFT directory on disk -> a validated LoadedAdapter."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path} has no adapter_config.json", "adapter_config.json")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        pickle = path / "adapter_model.bin"
        reason = " (adapter_model.bin is a pickle and is never loaded)" if pickle.exists() else ""
        raise AdapterError(f"{path} has no adapter_model.safetensors{reason}", "adapter_model.safetensors")
    config = parse_config((path / "adapter_config.json").read_bytes())
    return build_adapter(name, config, parse_tensors(weights.read_bytes()), base, max_rank)
