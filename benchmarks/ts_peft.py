"""Token-selective LoRA (TS-PEFT) against dense LoRA on a synthetic task with a held-out split.

The task: sequences that follow a fixed random permutation of 64 tokens (t[i+1] = pi(t[i]), with 10% of
steps replaced by a random token), loss on every token after the first. Train on 192 sequences,
validate on 64 others. For dense LoRA and target sparsity 0.3 / 0.5 / 0.7: final training loss,
validation loss (after the last epoch, and the best after any epoch), the share of token updates
skipped, and training tokens/s (fine-tuning alone; round-robin timing runs, median). TS rows use the
default shared threshold; one more row runs 0.5 with a threshold per module.

`--base pretrained` first gives the demo model the task: a dense LoRA trained on it for
`--pretrain-epochs` is merged into the weights (transformers + peft), and the runs above then learn a
variant in which a quarter of the permutation's entries moved. That is fine-tuning as TS-PEFT assumes
it: a base that already does most of the job, so many tokens need no update.

    python -m benchmarks.ts_peft [--sizes tiny,small] [--epochs 30] [--lr 1e-2] [--rounds 3]
                                 [--base random|pretrained] [--pretrain-epochs 30]
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import RESULTS, demo_checkpoint, table, write_result
from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.training.params import AdapterSpec
from coserve.engine.training.trainer import TrainingJobSpec, TrainSample


def task(vocab: int, count: int, length: int, seed: int, rng_seed: int, moved: float = 0.0) -> list[TrainSample]:
    """Chains over a permutation pi of 64 tokens; `moved`: that share of pi's entries get another moved
    entry's successor (a rotation among them, so each changes)."""
    alphabet = random.Random(seed).sample(range(100, vocab), 64)
    pi = dict(zip(alphabet, random.Random(seed + 1).sample(alphabet, 64)))
    if moved:
        sources = random.Random(seed + 2).sample(alphabet, round(moved * 64))
        successors = [pi[a] for a in sources]
        pi.update(zip(sources, successors[1:] + successors[:1]))
    rng = random.Random(rng_seed)
    samples = []
    for _ in range(count):
        ids = [rng.choice(alphabet)]
        for _ in range(length - 1):
            ids.append(pi[ids[-1]] if rng.random() > 0.1 else rng.choice(alphabet))
        samples.append(TrainSample(ids, [False] + [True] * (length - 1)))
    return samples


def spec(sparsity: float | None, args, train, valid, epochs: int, validate_every: int,
         shared: bool = True) -> TrainingJobSpec:
    adapter = AdapterSpec("LORA", r=16, lora_alpha=32, target_sparsity=sparsity, shared_threshold=shared)
    return TrainingJobSpec(f"ts-{sparsity}", "demo", adapter, train, valid, n_epochs=epochs, batch_size=8,
                           learning_rate=args.lr, seed=0, checkpoint_every=validate_every, microbatch_tokens=512)


def train(engine: LLMEngine, job: TrainingJobSpec) -> tuple[list, float]:
    events: list = []
    engine.submit_training(job, events.append)
    start = time.perf_counter()
    while engine.has_work:
        engine.step()
    return events, time.perf_counter() - start


def pretrained(engine: LLMEngine, size: str, args, train_set) -> Path:
    """demo-<size> with a dense LoRA trained on `train_set` merged into its weights (transformers + peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    events, _ = train(engine, spec(None, args, train_set, [], args.pretrain_epochs, 10**6))
    config, weights = next(e for e in events if e.kind == "succeeded").files
    adapter, out = RESULTS / f"ts-pretrain-adapter-{size}", RESULTS / f"demo-{size}-pretrained"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_bytes(config)
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    source = demo_checkpoint(size)
    base = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    shutil.rmtree(out, ignore_errors=True)
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


def quality(engine: LLMEngine, sparsity: float | None, shared: bool, args, train_set, valid_set) -> dict:
    """One run with validation after every epoch: final and best validation loss."""
    steps_per_epoch = -(-len(train_set) // 8)
    events, _ = train(engine, spec(sparsity, args, train_set, valid_set, args.epochs, steps_per_epoch, shared))
    steps = [e.data for e in events if e.kind == "metrics" and "train_loss" in e.data]
    valid = [e.data["valid_loss"] for e in events if e.kind == "metrics" and "valid_loss" in e.data]
    late = steps[len(steps) // 2 :]
    return {"method": "dense LoRA" if sparsity is None else f"TS-LoRA {sparsity}" + ("" if shared else " per module"),
            "train_loss": round(sum(s["train_loss"] for s in steps[-4:]) / len(steps[-4:]), 4),
            "valid_loss": round(valid[-1], 4), "best_valid": round(min(valid), 4),
            "best_epoch": valid.index(min(valid)) + 1,
            "skipped": round(sum(s["token_sparsity"] for s in late) / len(late), 3)}


def speeds(engine: LLMEngine, configs: list[tuple[float | None, bool]], args, train_set) -> list[float]:
    """Training tokens/s per configuration: the median of `rounds` runs taken in turn (no validation,
    no checkpoints), so drift of the machine's speed hits every configuration alike."""
    samples: list[list[float]] = [[] for _ in configs]
    for _ in range(args.rounds):
        for i, (sparsity, shared) in enumerate(configs):
            events, seconds = train(engine, spec(sparsity, args, train_set, [], args.timing_epochs, 10**6, shared))
            done = next(e for e in events if e.kind == "succeeded")
            samples[i].append(done.data["trained_tokens"] / seconds)
    return [statistics.median(s) for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--timing-epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", choices=["random", "pretrained"], default="random")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    args = ap.parse_args()
    results = {}
    configs = [(None, True), (0.3, True), (0.5, True), (0.7, True), (0.5, False)]  # (target sparsity, shared tau)
    for size in args.sizes.split(","):
        model = str(demo_checkpoint(size))
        engine = LLMEngine(EngineConfig(model=model, max_batch_tokens=1024, kv_cache_memory=1 << 26))
        vocab = engine.model.config.vocab_size
        train_set, valid_set = task(vocab, 192, 32, 7, 1), task(vocab, 64, 32, 7, 2)
        if args.base == "pretrained":  # the base learns the task, the jobs learn a quarter of it anew
            model = str(pretrained(engine, size, args, train_set))
            engine = LLMEngine(EngineConfig(model=model, max_batch_tokens=1024, kv_cache_memory=1 << 26))
            train_set, valid_set = task(vocab, 192, 32, 7, 1, moved=0.25), task(vocab, 64, 32, 7, 2, moved=0.25)
        train(engine, spec(None, argparse.Namespace(lr=args.lr), train_set[:16], valid_set[:8], 1, 10**6))  # warm-up
        rows = [quality(engine, s, shared, args, train_set, valid_set) for s, shared in configs]
        for row, tok_s in zip(rows, speeds(engine, configs, args, train_set)):
            row["train_tok_s"] = round(tok_s, 1)
        dense = rows[0]
        for row in rows:
            row["valid_vs_dense"] = round(row["valid_loss"] / dense["valid_loss"], 3)
            row["best_vs_dense"] = round(row["best_valid"] / dense["best_valid"], 3)
            row["speed_vs_dense"] = round(row["train_tok_s"] / dense["train_tok_s"], 3)
        print(f"demo-{size}")
        print(table(rows, list(rows[0])))
        results[size] = rows
    write_result("ts_peft" if args.base == "random" else "ts_peft_pretrained", {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
