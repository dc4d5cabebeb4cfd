"""HTTP load: N concurrent streaming chat clients against `coserve serve`, and the same load
against `transformers serve --continuous-batching` on the same checkpoint and dtype.

Prints requests/s, output tokens/s, TTFT and inter-token latency p50/p99 per server and
concurrency level, and the coserve / transformers ratio.

    python benchmarks/serve_load.py [--clients 1,16,64] [--rounds 2] [--max-tokens 64] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import RESULTS, demo_checkpoint, table, write_result

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{cmd} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "temperature": 0.0}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - start if stamps else None, "itl": [b - a for a, b in zip(stamps, stamps[1:])],
            "tokens": len(stamps), "end": time.perf_counter()}


async def load(url: str, model: str, clients: int, rounds: int, max_tokens: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(48)) for _ in range(clients * rounds)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker(i: int) -> list[dict]:
            return [await one_request(client, model, prompts[i * rounds + r], max_tokens) for r in range(rounds)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        elapsed = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    itls = sorted(x for r in results for x in r["itl"])
    pct = lambda xs, p: round(1000 * xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 1) if xs else None
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "seconds": round(elapsed, 2),
            "req_s": round(len(results) / elapsed, 2), "output_tok_s": round(tokens / elapsed, 1),
            "ttft_p50_ms": pct(ttfts, 50), "ttft_p99_ms": pct(ttfts, 99),
            "itl_p50_ms": pct(itls, 50), "itl_p99_ms": pct(itls, 99),
            "itl_mean_ms": round(1000 * statistics.fmean(itls), 1) if itls else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", default="1,16,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quantize", default="none")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--torch-threads", default="0")
    ap.add_argument("--transformers-clients", default="64")
    args = ap.parse_args()
    model_dir = args.model or str(demo_checkpoint("small"))
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    RESULTS.mkdir(parents=True, exist_ok=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "coserve.cli", "serve", "--model", model_dir, "--port", str(port),
                  "--served-model-name", "demo", "--dtype", "bfloat16", "--quantize", args.quantize,
                  "--max-num-seqs", str(max(levels)), "--kv-cache-memory", "1GiB", "--log-level", "warning",
                  "--torch-threads", args.torch_threads],
                 url + "/ready", RESULTS / "serve_load-coserve.log")
    try:
        for clients in levels:
            rows.append({"server": "coserve", **asyncio.run(load(url, "demo", clients, args.rounds,
                                                                     args.max_tokens))})
            print(rows[-1], flush=True)
    finally:
        stop(proc)

    if not args.skip_transformers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start([str(Path(sys.executable).parent / "transformers"), "serve", model_dir, "--continuous-batching",
                      "--dtype", "bfloat16", "--device", "cpu", "--port", str(port), "--host", "127.0.0.1"],
                     url + "/health", RESULTS / "serve_load-transformers.log")
        try:
            for clients in [int(c) for c in args.transformers_clients.split(",")]:
                rows.append({"server": "transformers serve --continuous-batching",
                             **asyncio.run(load(url, model_dir, clients, args.rounds, args.max_tokens))})
                print(rows[-1], flush=True)
        finally:
            stop(proc)

    print(table(rows, list(rows[0])))
    ratios = {}
    for row in rows:
        if row["server"] != "coserve":
            ours = next((r for r in rows if r["server"] == "coserve" and r["clients"] == row["clients"]), None)
            if ours:
                ratios[row["clients"]] = {
                    "output_tok_s_ratio": round(ours["output_tok_s"] / row["output_tok_s"], 2),
                    "itl_p99_ms": {"coserve": ours["itl_p99_ms"], "transformers": row["itl_p99_ms"]},
                }
    print({"coserve_vs_transformers": ratios})
    write_result("serve_load", {"model": model_dir, "max_tokens": args.max_tokens, "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
