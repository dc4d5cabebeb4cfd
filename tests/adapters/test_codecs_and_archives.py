"""ComPEFT against its definition, and the in-memory archive reader's caps and refusals."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch
from safetensors.torch import load as load_st
from safetensors.torch import save as save_st

from coserve.adapters import codecs
from coserve.adapters.archive import read_archive, write_tar_gz
from coserve.adapters.types import AdapterError
from tests.server.store_helpers import tar_gz


@pytest.mark.parametrize("shape,density", [((16, 64), 0.1), ((7, 13), 0.3), ((1, 5), 0.5), ((33,), 1.0)])
def test_compeft_keeps_the_largest_entries_signs_and_the_least_squares_scale(shape, density):
    torch.manual_seed(0)
    tau = torch.randn(shape)
    parts = codecs.compress_tensor(tau, density)
    decoded = codecs.decompress_tensor(parts, list(shape), torch.float32)
    flat, out = tau.reshape(-1), decoded.reshape(-1)
    k = max(1, round(density * flat.numel()))
    kept = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))[:k]  # reference top-k
    assert set(torch.nonzero(out).reshape(-1).tolist()) == set(kept)
    scale = sum(abs(float(flat[i])) for i in kept) / k
    for i in kept:
        assert float(out[i]) == pytest.approx(scale * (1 if flat[i] > 0 else -1), rel=1e-5)
    # least squares: no other scale on this support is closer to tau
    err = lambda s: float(((flat - out / scale * s) ** 2).sum())  # noqa: E731
    assert err(scale) <= min(err(scale * 0.9), err(scale * 1.1))


def test_compeft_encode_decode_roundtrip_and_ratio():
    torch.manual_seed(1)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(16, 576),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(576, 16),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.rand(576) + 0.5,
    }
    raw = save_st(tensors)
    stored = codecs.encode("compeft", raw, tensors, density=0.1)
    dense = load_st(codecs.decode("compeft", stored))
    assert set(dense) == set(tensors)
    for key, tensor in tensors.items():
        if codecs.compressible(key):
            expect = codecs.decompress_tensor(codecs.compress_tensor(tensor, 0.1), list(tensor.shape), tensor.dtype)
            assert torch.equal(dense[key], expect)
        else:  # DoRA magnitudes are kept exactly
            assert torch.equal(dense[key], tensor)
    lora_bytes = sum(t.numel() * 4 for k, t in tensors.items() if codecs.compressible(k))
    stored_lora = len(stored) - tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]\
        .numel() * 4
    assert lora_bytes / stored_lora > 20  # (1 + 0.1) bits per entry instead of 32, plus headers
    assert codecs.encode("none", raw, tensors, 0.1) == raw


def test_compeft_refuses_bad_parameters():
    tensors = {"x.lora_A.weight": torch.ones(2, 2)}
    with pytest.raises(AdapterError) as err:
        codecs.encode("compeft", b"", tensors, density=0)
    assert err.value.field == "compeft_density"
    with pytest.raises(AdapterError) as err:
        codecs.encode("compeft", b"", {"x.shira_weight": torch.ones(3)}, density=0.1)
    assert err.value.field == "codec"


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


GOOD = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights", "README.md": b"hi"}


def test_archives_in_either_format_and_layout_are_read():
    for raw, name in ((tar_gz(GOOD), "a.tar.gz"), (_zip({f"dir/{k}": v for k, v in GOOD.items()}), "a.zip")):
        files = read_archive(raw, name, max_bytes=1 << 20)
        assert (files.config, files.weights) == (b"{}", b"weights")
    written = write_tar_gz({"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights"}, "bot")
    assert read_archive(written, "bot.tar.gz", 1 << 20).weights == b"weights"


@pytest.mark.parametrize("raw,field_or_text", [
    (tar_gz({"../adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}), "parent path"),
    (tar_gz({"/abs/adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}), "absolute"),
    (_zip({"../../adapter_model.safetensors": b"w", "adapter_config.json": b"{}"}), "parent path"),
    (tar_gz(GOOD, link="adapter_model.bin"), "link"),
    (tar_gz({f"f{i}.txt": b"x" for i in range(40)}), "more than 32"),
    (tar_gz({"adapter_config.json": b"{}", "adapter_model.safetensors": b"w" * 5000}), "unpacks to more"),
    (tar_gz({"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04pickle"}), "is a pickle"),
    (tar_gz({"adapter_model.safetensors": b"w"}), "no adapter_config.json"),
    (b"not an archive at all", "not a readable"),
])
def test_bad_archives_are_refused_with_a_reason(raw, field_or_text):
    with pytest.raises(AdapterError) as err:
        read_archive(raw, "upload.tar.gz", max_bytes=4096)
    assert field_or_text in str(err.value)
