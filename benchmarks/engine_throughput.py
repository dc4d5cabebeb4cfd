"""Output tokens/s of the continuous-batching engine against the same requests run one at a time.

    python benchmarks/engine_throughput.py [--requests 64] [--prompt-len 128] [--output-len 128] [--quantize none]
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import demo_checkpoint, table, write_result
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.scheduler.request import SamplingParams


def make_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(count)]


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, batched: bool) -> tuple[float, int]:
    """Seconds and output tokens for all prompts, together or one request at a time."""
    produced = 0
    start = time.perf_counter()
    groups = [prompts] if batched else [[p] for p in prompts]
    for g, group in enumerate(groups):
        for i, prompt in enumerate(group):
            engine.add_request(f"{batched}-{g}-{i}-{time.monotonic_ns()}", prompt, params)
        while engine.has_work:
            for out in engine.step():
                produced += sum(len(d.token_ids) for d in out.deltas)
    return time.perf_counter() - start, produced


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--quantize", default="none")
    args = ap.parse_args()
    model = args.model or str(demo_checkpoint("small"))
    engine = LLMEngine(EngineConfig(model=model, quantize=args.quantize, max_num_seqs=args.requests,
                                    max_batch_tokens=2048, kv_cache_memory=1 << 30))
    prompts = make_prompts(args.requests, args.prompt_len, engine.model.config.vocab_size)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    run(engine, prompts[:2], SamplingParams(max_tokens=4), batched=True)  # warm up
    rows = []
    for batched in (True, False):
        seconds, tokens = run(engine, prompts, params, batched)
        rows.append({"mode": "continuous batching" if batched else "one at a time", "requests": args.requests,
                     "output_tokens": tokens, "seconds": round(seconds, 2), "output_tok_s": round(tokens / seconds, 1)})
    speedup = round(rows[0]["output_tok_s"] / rows[1]["output_tok_s"], 2)
    print(table(rows, list(rows[0])))
    print({"speedup": speedup})
    write_result("engine_throughput", {"model": model, "quantize": args.quantize, "prompt_len": args.prompt_len,
                                       "output_len": args.output_len, "rows": rows, "speedup": speedup})


if __name__ == "__main__":
    main()
