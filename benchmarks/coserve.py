"""Co-serving: a LoRA fine-tuning job and inference at a fixed request rate in the same engine.

(a) fine-tuning alone: training tokens/s;
(b) inference alone at --rate requests/s (Poisson arrivals): inter-token latency p50/p99, TTFT;
(c) both at once: training tokens/s while inference runs (kept share of (a)) and ITL p50/p99;
(d) the same work one after the other (a then b) against (c), in wall time.

    python benchmarks/coserve.py [--rate 2] [--duration 30] [--samples 160] [--itl-slo-ms 250]
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import demo_checkpoint, table, write_result
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.training.params import AdapterSpec
from coserve.engine.training.trainer import TrainingJobSpec, TrainSample
from coserve.scheduler.request import SamplingParams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def job_spec(args, vocab: int, job_id: str) -> TrainingJobSpec:
    rng = random.Random(1)
    samples = []
    for _ in range(args.samples):
        ids = [rng.randrange(10, vocab) for _ in range(args.sample_len)]
        samples.append(TrainSample(ids, [False] * (args.sample_len // 2) + [True] * (args.sample_len // 2)))
    return TrainingJobSpec(job_id, "demo-small", AdapterSpec("LORA", r=16, lora_alpha=32), samples, n_epochs=1,
                           batch_size=8, learning_rate=2e-4, seed=0, checkpoint_every=10**6,
                           microbatch_tokens=args.microbatch_tokens)


def arrivals(args, vocab: int) -> list[tuple[float, list[int]]]:
    rng = random.Random(2)
    t, out = 0.0, []
    while t < args.duration:
        out.append((t, [rng.randrange(10, vocab) for _ in range(args.prompt_len)]))
        t += rng.expovariate(args.rate)
    return out


def run(engine: LLMEngine, args, train: bool, infer: bool, tag: str) -> dict:
    """Step the engine until the chosen work is done; latency and training figures."""
    events: list = []
    if train:
        engine.submit_training(job_spec(args, engine.model.config.vocab_size, f"job-{tag}"), events.append)
    pending = arrivals(args, engine.model.config.vocab_size) if infer else []
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    last_token: dict[str, float] = {}
    itl, ttft, added = [], [], {}
    start = time.perf_counter()
    window = None  # (seconds, training tokens) when both ran together: until inference or the job ended
    tokens_so_far = 0
    while pending or engine.has_work:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, prompt = pending.pop(0)
            rid = f"{tag}-{len(added)}"
            added[rid] = start + at
            engine.add_request(rid, prompt, params)
        if not engine.has_work:
            time.sleep(min(0.005, max(0.0, pending[0][0] - now)))
            continue
        outputs = engine.step()
        stamp = time.perf_counter()
        for out in outputs:
            if not out.deltas or not out.deltas[0].token_ids:
                continue
            previous = last_token.get(out.request_id)
            (itl if previous is not None else ttft).append(stamp - (previous or added[out.request_id]))
            last_token[out.request_id] = stamp
        if engine.training.jobs:
            tokens_so_far = engine.training.jobs[0].progress.trained_tokens
        elif events and window is None:  # the job ended first
            window = (stamp - start, events[-1].data.get("trained_tokens", tokens_so_far))
        if infer and window is None and not pending and engine.num_active_requests == 0:
            window = (stamp - start, tokens_so_far)  # inference ended first
    wall = time.perf_counter() - start
    done = next((e for e in events if e.kind in ("succeeded", "failed")), None)
    result = {"mode": tag, "wall_s": round(wall, 1)}
    if train:
        assert done is not None and done.kind == "succeeded", events[-1:]
        total = done.data["trained_tokens"]
        result["train_tok_s"] = round(total / wall, 1) if not infer else round(window[1] / window[0], 1)
        result["trained_tokens"] = total
    if infer:
        result.update(requests=len(added), itl_p50_ms=round(1000 * percentile(itl, 0.5), 1),
                      itl_p99_ms=round(1000 * percentile(itl, 0.99), 1),
                      ttft_p50_ms=round(1000 * percentile(ttft, 0.5), 1),
                      ttft_p99_ms=round(1000 * percentile(ttft, 0.99), 1),
                      decode_tok_s=round(len(itl) / wall, 1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--rate", type=float, default=2.0, help="inference requests per second")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of inference arrivals")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--samples", type=int, default=160, help="training samples (one epoch)")
    ap.add_argument("--sample-len", type=int, default=128)
    ap.add_argument("--microbatch-tokens", type=int, default=1024)
    ap.add_argument("--itl-slo-ms", type=float, default=100.0, help="0: no latency bound")
    args = ap.parse_args()
    model = args.model or str(demo_checkpoint("small"))
    engine = LLMEngine(EngineConfig(model=model, quantize=args.quantize, max_batch_tokens=1024,
                                    kv_cache_memory=1 << 29, itl_slo_ms=args.itl_slo_ms or None))
    warm = argparse.Namespace(**{**vars(args), "samples": 8, "duration": 2.0})
    run(engine, warm, train=True, infer=True, tag="warm-up")
    a = run(engine, args, train=True, infer=False, tag="(a) fine-tuning alone")
    b = run(engine, args, train=False, infer=True, tag="(b) inference alone")
    c = run(engine, args, train=True, infer=True, tag="(c) co-served")
    kept = c["train_tok_s"] / a["train_tok_s"]
    itl_ratio = c["itl_p99_ms"] / b["itl_p99_ms"]
    sequential = a["wall_s"] + b["wall_s"]
    d = {"mode": "(d) one after the other (a + b)", "wall_s": round(sequential, 1)}
    rows = [a, b, c, d]
    print(table(rows, ["mode", "wall_s", "train_tok_s", "requests", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms",
                       "ttft_p99_ms", "decode_tok_s"]))
    summary = {"training_kept": round(kept, 3), "itl_p99_ratio": round(itl_ratio, 3),
               "co_served_wall_vs_sequential": round(c["wall_s"] / sequential, 3)}
    print(summary)
    write_result(f"coserve-slo{int(args.itl_slo_ms)}", {"model": model, "args": vars(args), "rows": rows, **summary})


if __name__ == "__main__":
    main()
