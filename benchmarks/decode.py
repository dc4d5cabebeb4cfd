"""Decode speed of the quantized base: tokens/s and weight bytes for none / int8 / int4 at
batch 1 and 16 on demo-small, with the batch-1 roofline (weight bytes read per token against
the measured memory-copy bandwidth). The row `none-unpacked` runs bfloat16 through plain F.linear
(`prepack_weights=False`), the path before the oneDNN weight packing, for comparison.

    python benchmarks/decode.py [--steps 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import demo_checkpoint, table, write_result
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.quantize import module_bytes
from coserve.scheduler.request import SamplingParams


def copy_bandwidth(num_bytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (read + write counted)."""
    src = torch.ones(num_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * num_bytes / best


def decode_rate(engine: LLMEngine, batch: int, steps: int, prompt_len: int = 32) -> float:
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", [(7 * i + j) % 1000 + 10 for j in range(prompt_len)],
                           params)
    while any(seq.in_prefill for seq in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    engine.step()  # one warm decode
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - t
    while engine.has_work:
        engine.step()
    return batch * steps / elapsed


def weight_bytes(engine: LLMEngine) -> dict:
    m = engine.model
    linear = engine.quantize_report.linear_bytes
    lm_head = module_bytes(m.lm_head)
    return {"linear_bytes": linear, "lm_head_bytes": lm_head, "bytes_per_token": linear + lm_head}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--trials", type=int, default=3, help="interleaved trials per setting; the best one counts")
    args = ap.parse_args()
    model = args.model or str(demo_checkpoint("small"))
    bandwidth = copy_bandwidth()
    settings = {"none": ("none", True), "none-unpacked": ("none", False), "int8": ("int8", True),
                "int4": ("int4", True)}  # row -> (quantize, prepack_weights)
    engines = {mode: LLMEngine(EngineConfig(model=model, quantize=q, prepack_weights=prepack, dtype="bfloat16",
                                            kv_cache_memory=256 * 2**20, max_num_seqs=16))
               for mode, (q, prepack) in settings.items()}
    best: dict[tuple[str, int], float] = {}
    for _ in range(args.trials):  # interleaved, so a slow spell of the machine hits every mode alike
        for batch in (1, 16):
            for mode, engine in engines.items():
                rate = decode_rate(engine, batch, args.steps)
                best[mode, batch] = max(best.get((mode, batch), 0.0), rate)
    rows = []
    for mode, engine in engines.items():
        wb = weight_bytes(engine)
        roofline = bandwidth / wb["bytes_per_token"]
        for batch in (1, 16):
            rate = best[mode, batch]
            rows.append({"quantize": mode, "batch": batch, "tokens_per_s": round(rate, 1),
                         "linear_MiB": round(wb["linear_bytes"] / 2**20, 1),
                         "bytes_per_token_MiB": round(wb["bytes_per_token"] / 2**20, 1),
                         "roofline_tok_s": round(roofline, 1) if batch == 1 else "",
                         "roofline_frac": round(rate / roofline, 3) if batch == 1 else ""})
    by = {(r["quantize"], r["batch"]): r for r in rows}
    summary = {
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "int4_vs_bf16_batch1_speedup": round(by["int4", 1]["tokens_per_s"] / by["none", 1]["tokens_per_s"], 2),
        "int8_vs_bf16_batch1_speedup": round(by["int8", 1]["tokens_per_s"] / by["none", 1]["tokens_per_s"], 2),
        "int4_vs_unpacked_bf16_batch1_speedup": round(by["int4", 1]["tokens_per_s"]
                                                      / by["none-unpacked", 1]["tokens_per_s"], 2),
        "packed_vs_unpacked_bf16_batch1_speedup": round(by["none", 1]["tokens_per_s"]
                                                        / by["none-unpacked", 1]["tokens_per_s"], 2),
        "int4_linear_weight_ratio": round(by["int4", 1]["linear_MiB"] / by["none", 1]["linear_MiB"], 3),
        "int8_linear_weight_ratio": round(by["int8", 1]["linear_MiB"] / by["none", 1]["linear_MiB"], 3),
    }
    print(table(rows, list(rows[0])))
    print(summary)
    write_result("decode", {"model": model, "steps": args.steps, "trials": args.trials, "rows": rows,
                            "summary": summary})


if __name__ == "__main__":
    main()
