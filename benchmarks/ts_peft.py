"""Token-selective LoRA (TS-PEFT) against dense LoRA on a synthetic task with a held-out split.

The task: sequences that follow a fixed random permutation of 64 tokens (t[i+1] = pi(t[i]), with 10% of
steps replaced by a random token), loss on every token after the first. Train on 192 sequences,
validate on 64 others. For dense LoRA and target sparsity 0.3 / 0.5 / 0.7: final training loss,
validation loss, the share of token updates skipped, and training tokens/s (fine-tuning alone).

    python -m benchmarks.ts_peft [--sizes tiny,small] [--epochs 3]
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import demo_checkpoint, table, write_result
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.training.params import AdapterSpec
from coserve.engine.training.trainer import TrainingJobSpec, TrainSample


def task(vocab: int, count: int, length: int, seed: int, rng_seed: int) -> list[TrainSample]:
    alphabet = random.Random(seed).sample(range(100, vocab), 64)
    pi = dict(zip(alphabet, random.Random(seed + 1).sample(alphabet, 64)))
    rng = random.Random(rng_seed)
    samples = []
    for _ in range(count):
        ids = [rng.choice(alphabet)]
        for _ in range(length - 1):
            ids.append(pi[ids[-1]] if rng.random() > 0.1 else rng.choice(alphabet))
        samples.append(TrainSample(ids, [False] + [True] * (length - 1)))
    return samples


def run(engine: LLMEngine, sparsity: float | None, args, train, valid) -> dict:
    adapter = AdapterSpec("LORA", r=16, lora_alpha=32, target_sparsity=sparsity)
    spec = TrainingJobSpec(f"ts-{sparsity}", "demo", adapter, train, valid, n_epochs=args.epochs, batch_size=8,
                           learning_rate=args.lr, seed=0, checkpoint_every=10**6, microbatch_tokens=512)
    events: list = []
    engine.submit_training(spec, events.append)
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    seconds = time.perf_counter() - start
    done = next(e for e in events if e.kind == "succeeded")
    steps = [e.data for e in events if e.kind == "metrics" and "train_loss" in e.data]
    late = steps[len(steps) // 2 :]
    return {"method": "dense LoRA" if sparsity is None else f"TS-LoRA {sparsity}",
            "train_loss": round(sum(s["train_loss"] for s in steps[-4:]) / len(steps[-4:]), 4),
            "valid_loss": round(done.data["valid_loss"], 4),
            "skipped": round(sum(s["token_sparsity"] for s in late) / len(late), 3),
            "train_tok_s": round(done.data["trained_tokens"] / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    results = {}
    for size in args.sizes.split(","):
        model = str(demo_checkpoint(size))
        engine = LLMEngine(EngineConfig(model=model, max_batch_tokens=1024, kv_cache_memory=1 << 26))
        vocab = engine.model.config.vocab_size
        train, valid = task(vocab, 192, 32, 7, 1), task(vocab, 64, 32, 7, 2)
        run(engine, None, argparse.Namespace(epochs=1, lr=args.lr), train[:16], valid[:8])  # warm-up
        rows = [run(engine, s, args, train, valid) for s in (None, 0.3, 0.5, 0.7)]
        dense = rows[0]
        for row in rows:
            row["valid_vs_dense"] = round(row["valid_loss"] / dense["valid_loss"], 3)
            row["speed_vs_dense"] = round(row["train_tok_s"] / dense["train_tok_s"], 3)
        print(f"demo-{size}")
        print(table(rows, list(rows[0])))
        results[size] = rows
    write_result("ts_peft", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
