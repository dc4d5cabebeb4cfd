"""A small fine-tuning set the tiny demo model can learn, and job helpers over the openai SDK."""

from __future__ import annotations

import json
import time

import openai

WORDS = ("apple river cloud stone maple tiger violet copper lemon harbor falcon velvet cobalt meadow pepper "
         "orbit").split()
COLORS = "red blue green white black pink gold gray brown cyan teal navy olive silver amber ivory".split()
PAIRS = [(f"Name the color of {w}:", f" {c}") for w, c in zip(WORDS, COLORS)]
TERMINAL = ("succeeded", "failed", "cancelled")


def jsonl(rows: list[dict]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def pairs_file(client: openai.OpenAI, pairs=PAIRS, padding: str = "") -> str:
    rows = [{"prompt": padding + p, "completion": a} for p, a in pairs]
    return client.files.create(file=("train.jsonl", jsonl(rows)), purpose="fine-tune").id


def hyper(n_epochs: int, batch_size: int = 4, lr: float = 50.0) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": n_epochs, "batch_size": batch_size, "learning_rate_multiplier": lr}}}


def wait_job(client: openai.OpenAI, job_id: str, timeout: float = 120, until=TERMINAL):
    deadline = time.monotonic() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in until and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


def events(client: openai.OpenAI, job_id: str) -> list:
    """Every event of the job, oldest first (the API pages newest first)."""
    page = client.fine_tuning.jobs.list_events(job_id, limit=100)
    data = list(page.data)
    while page.has_more:
        page = client.fine_tuning.jobs.list_events(job_id, limit=100, after=data[-1].id)
        data += page.data
    return list(reversed(data))


def metrics(client: openai.OpenAI, job_id: str) -> list[dict]:
    return [e.data for e in events(client, job_id) if e.type == "metrics"]


def messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in events(client, job_id)]
