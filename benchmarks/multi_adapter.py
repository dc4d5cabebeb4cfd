"""Mixed-adapter serving cost: 64 requests over N distinct rank-16 LoRA adapters (and DoRA, RoAd,
SHiRA rows) against the same requests on the base model alone, and against transformers + peft's
mixed-adapter `generate(adapter_names=...)`.

Every adapter run is paired with a base run (and every peft run with a coserve run) timed just
before it, in every trial; a row's slowdown (and the speedup over peft) is the median of its paired
ratios over the trials.

Adapters are written in PEFT's on-disk format (seeded random tensors, all seven projections)
and served through the same path as `--adapter`.

    python -m benchmarks.multi_adapter [--adapters 1,8,32,128] [--output-len 64] [--peft 8,32]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.common import RESULTS, demo_checkpoint, table, write_result
from coserve.engine.adapter_runtime import base_shape
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.scheduler.request import SamplingParams

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(path: Path, method: str, shape, seed: int, rank: int = 16) -> Path:
    """A PEFT directory with seeded random tensors on every projection of every layer."""
    if (path / "adapter_model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors, config = {}, {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(MODULES),
                           "task_type": "CAUSAL_LM", "bias": "none"}
    if method == "DORA":
        config["use_dora"] = True
    if method == "ROAD":
        config = {"peft_type": "ROAD", "variant": "road_1", "group_size": 64, "target_modules": list(MODULES)}
    if method == "SHIRA":
        config = {"peft_type": "SHIRA", "r": rank, "mask_type": "random", "target_modules": list(MODULES)}
    for layer in range(shape.num_layers):
        for module in MODULES:
            out_f, in_f = shape.module_shapes[module]
            section = "self_attn" if module in MODULES[:4] else "mlp"
            p = f"base_model.model.model.layers.{layer}.{section}.{module}."
            if method in ("LORA", "DORA"):
                tensors[p + "lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
                tensors[p + "lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
                if method == "DORA":
                    tensors[p + "lora_magnitude_vector"] = torch.rand(out_f, generator=gen) + 0.5
            elif method == "ROAD":
                tensors[p + "road_theta"] = torch.randn(out_f // 2, generator=gen) * 0.1
                tensors[p + "road_alpha"] = 1 + torch.randn(out_f // 2, generator=gen) * 0.1
            else:
                k = rank * (in_f + out_f)
                flat = torch.randperm(out_f * in_f, generator=gen)[:k]
                tensors[p + "shira_indices"] = torch.stack([flat // in_f, flat % in_f]).to(torch.int32)
                tensors[p + "shira_weight"] = torch.randn(k, generator=gen) * 0.01
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def requests(n_requests: int, prompt_len: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(n_requests)]


def coserve_rate(engine: LLMEngine, prompts, adapter_of: list[str | None], output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapter_of)):
        engine.add_request(f"{time.monotonic_ns()}-{i}", prompt, params, adapter)
    produced, start = 0, time.perf_counter()
    while engine.has_work:
        for out in engine.step():
            produced += sum(len(d.token_ids) for d in out.deltas)
        if not engine.last_step_tokens:
            time.sleep(0.001)
    return produced / (time.perf_counter() - start)


def peft_rate(model_dir: str, dirs: list[Path], prompts, adapter_of: list[str], output_len: int) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        model.load_adapter(str(d), adapter_name=d.name)
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, adapter_names=adapter_of, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--adapters", default="1,8,32,128")
    ap.add_argument("--methods-at", type=int, default=32, help="adapter count for the DoRA/RoAd/SHiRA rows")
    ap.add_argument("--methods", default="DORA,ROAD,SHIRA", help="other methods run at --methods-at adapters")
    ap.add_argument("--peft", default="8,32", help="adapter counts also run through transformers + peft")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    model = args.model or str(demo_checkpoint("small"))
    counts = [int(c) for c in args.adapters.split(",")]
    # every run sends the same prompts: without prefix caching each run computes its prefill (with it, a base
    # run right after another would reuse its blocks while adapter runs, keyed by adapter, would not)
    engine = LLMEngine(EngineConfig(model=model, max_num_seqs=args.requests, max_batch_tokens=512,
                                    kv_cache_memory=1 << 30, max_loras=args.requests, max_cpu_loras=256,
                                    enable_prefix_caching=False))
    shape = base_shape(engine.model)
    root = RESULTS / "adapters"
    prompts = requests(args.requests, args.prompt_len, engine.model.config.vocab_size)
    coserve_rate(engine, prompts, [None] * args.requests, 4)  # warm up
    methods = [m for m in args.methods.split(",") if m]
    runs = [("BASE", 0)] + [("LORA", n) for n in counts] + [(m, args.methods_at) for m in methods]
    peft_counts = [int(c) for c in args.peft.split(",") if c]
    dirs_of: dict[tuple[str, int], list[Path]] = {}
    adapters_of: dict[tuple[str, int], list[str | None]] = {("BASE", 0): [None] * args.requests}
    for method, n in runs[1:] + [("LORA", n) for n in peft_counts]:  # the peft rows serve LoRA adapters too
        if (method, n) in dirs_of:
            continue
        dirs = [write_adapter(root / f"{method.lower()}-{i}", method, shape, seed=i) for i in range(n)]
        dirs_of[method, n] = dirs
        for d in dirs:
            if not engine.adapters.known(d.name):
                engine.adapters.register_dir(d.name, d, preload=False)
        adapters_of[method, n] = [dirs[i % n].name for i in range(args.requests)]
    best: dict[tuple[str, int], float] = {}
    peft_best: dict[int, float] = {}
    peft_pairs: dict[int, list[float]] = {}
    paired: dict[tuple[str, int], list[float]] = {key: [] for key in runs[1:]}
    base = runs[0]
    for _ in range(args.trials):  # interleaved trials: this machine's speed drifts by 20% within minutes
        for key in runs[1:]:
            # each adapter row is timed right after a base run of its own, and its slowdown is the median
            # of these paired ratios, so that the drift between rows minutes apart does not enter it
            base_rate = coserve_rate(engine, prompts, adapters_of[base], args.output_len)
            best[base] = max(best.get(base, 0.0), base_rate)
            coserve_rate(engine, prompts[: key[1]], adapters_of[key][: key[1]], 2)  # every adapter loaded once
            rate = coserve_rate(engine, prompts, adapters_of[key], args.output_len)
            best[key] = max(best.get(key, 0.0), rate)
            paired[key].append(base_rate / rate)
            print(key, round(rate, 1), "base", round(base_rate, 1), "ratio", round(base_rate / rate, 3), flush=True)
        for n in peft_counts:  # each peft run paired with a coserve run of the same requests right before it
            adapter_of = adapters_of["LORA", n]
            coserve_rate(engine, prompts[:n], adapter_of[:n], 2)  # every adapter loaded once
            ours = coserve_rate(engine, prompts, adapter_of, args.output_len)
            rate = peft_rate(model, dirs_of["LORA", n], prompts, adapter_of, args.output_len)
            peft_best[n] = max(peft_best.get(n, 0.0), rate)
            peft_pairs.setdefault(n, []).append(ours / rate)
            print(("PEFT", n), round(rate, 1), "coserve", round(ours, 1), "speedup", round(ours / rate, 2), flush=True)
    rows = [{"method": "base model", "adapters": 0, "output_tok_s": round(best[base], 1), "slowdown_vs_base": 1.0}]
    rows += [{"method": m, "adapters": n, "output_tok_s": round(best[m, n], 1),
              "slowdown_vs_base": round(statistics.median(paired[m, n]), 3),
              "paired_ratios": [round(r, 3) for r in paired[m, n]]} for m, n in runs[1:]]
    for n in peft_counts:
        rows.append({"method": "transformers + peft (LORA)", "adapters": n, "output_tok_s": round(peft_best[n], 1),
                     "slowdown_vs_base": round(best[base] / peft_best[n], 3),
                     "coserve_speedup": round(statistics.median(peft_pairs[n]), 2),
                     "paired_speedups": [round(r, 2) for r in peft_pairs[n]]})
    columns = ["method", "adapters", "output_tok_s", "slowdown_vs_base", "coserve_speedup"]
    print(table(rows, columns))
    write_result("multi_adapter", {"model": model, "requests": args.requests, "prompt_len": args.prompt_len,
                                   "output_len": args.output_len, "rows": rows})


if __name__ == "__main__":
    main()
