"""The client side of the `coserve` CLI: generate, chat, models, adapters, finetune.

Every command takes --url / COSERVE_URL, --api-key / COSERVE_API_KEY and --json (machine output);
a server error prints its status and message to stderr and exits 1.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict, is_dataclass

import click
import httpx

from coserve.clients.client import Client, extract_adapter
from coserve.clients.types import CoserveError, Job


def _options(func):
    @click.option("--url", envvar="COSERVE_URL", default="http://127.0.0.1:8000", show_default=True,
                  help="server address (COSERVE_URL)")
    @click.option("--api-key", envvar="COSERVE_API_KEY", default=None, help="API key (COSERVE_API_KEY)")
    @click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
    @functools.wraps(func)
    def wrapper(url: str, api_key: str | None, as_json: bool, **kwargs):
        client = Client(url, api_key or "")
        try:
            return func(client, as_json, **kwargs)
        except CoserveError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except httpx.HTTPError as exc:
            click.echo(f"error: cannot reach {url}: {exc}", err=True)
            sys.exit(1)
        finally:
            client.close()
    return wrapper


def _emit(value, as_json: bool, text: str) -> None:
    if as_json:
        raw = [v.raw if hasattr(v, "raw") else v for v in value] if isinstance(value, list) else \
            getattr(value, "raw", asdict(value) if is_dataclass(value) else value)
        click.echo(json.dumps(raw, indent=2))
    else:
        click.echo(text)


@click.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@_options
def generate(client: Client, as_json: bool, model: str, prompt: str, max_tokens: int, temperature: float) -> None:
    """Complete PROMPT with MODEL (the base model or an adapter), streamed to the terminal."""
    if as_json:
        _emit(client.complete(model, prompt, max_tokens=max_tokens, temperature=temperature), True, "")
        return
    for chunk in client.complete(model, prompt, stream=True, max_tokens=max_tokens, temperature=temperature):
        click.echo(chunk.text, nl=False)
    click.echo()


@click.command()
@click.argument("model")
@click.argument("message", required=False)
@click.option("--system", default=None, help="system message")
@click.option("--max-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@_options
def chat(client: Client, as_json: bool, model: str, message: str | None, system: str | None, max_tokens: int,
         temperature: float) -> None:
    """Chat with MODEL: one MESSAGE, or a conversation read line by line from stdin."""
    history = [{"role": "system", "content": system}] if system else []
    lines = [message] if message is not None else (line.rstrip("\n") for line in sys.stdin)
    for line in lines:
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        if as_json:
            reply = client.chat(model, history, max_tokens=max_tokens, temperature=temperature)
            _emit(reply, True, "")
            text = reply.text
        else:
            text = ""
            for chunk in client.chat(model, history, stream=True, max_tokens=max_tokens, temperature=temperature):
                click.echo(chunk.text, nl=False)
                text += chunk.text
            click.echo()
        history.append({"role": "assistant", "content": text})


@click.command()
@_options
def models(client: Client, as_json: bool) -> None:
    """List the models this key may use (the base model and adapters)."""
    found = client.models()
    _emit(found, as_json, "\n".join(f"{m.id}" + (f"  (adapter of {m.parent})" if m.parent and m.parent != m.id
                                                  else "") for m in found))


@click.group()
def adapters() -> None:
    """Your adapters in the store: push, ls, rm, pull."""


@adapters.command("push")
@click.argument("name")
@click.argument("path", type=click.Path(exists=True))
@click.option("--codec", type=click.Choice(["none", "compeft"]), default="none", show_default=True)
@_options
def adapters_push(client: Client, as_json: bool, name: str, path: str, codec: str) -> None:
    """Upload the PEFT directory (or .tar.gz/.zip) at PATH as NAME."""
    record = client.adapters.upload(name, path, codec=codec)
    _emit(record, as_json, f"{record.id} version {record.version} ({record.method}, rank {record.rank})")


@adapters.command("ls")
@_options
def adapters_ls(client: Client, as_json: bool) -> None:
    found = client.adapters.list()
    _emit(found, as_json, "\n".join(f"{a.id}\tv{a.version}\t{a.method}\trank {a.rank}\t{a.codec}" for a in found))


@adapters.command("rm")
@click.argument("name")
@_options
def adapters_rm(client: Client, as_json: bool, name: str) -> None:
    _emit(client.adapters.delete(name), as_json, f"deleted {name}")


@adapters.command("pull")
@click.argument("name")
@click.argument("dest", type=click.Path(file_okay=False))
@_options
def adapters_pull(client: Client, as_json: bool, name: str, dest: str) -> None:
    """Download NAME as a PEFT directory into DEST."""
    path = extract_adapter(client.adapters.download(name), dest)
    _emit({"name": name, "path": str(path)}, as_json, f"wrote {name} to {path}")


@click.group()
def finetune() -> None:
    """Fine-tuning jobs: create, ls, status, logs, cancel."""


def _job_line(job: Job) -> str:
    tail = f" -> {job.fine_tuned_model}" if job.fine_tuned_model else ""
    error = f" ({job.error.get('code')}: {job.error.get('message')})" if job.error else ""
    return f"{job.id}\t{job.status}\t{job.model}{tail}{error}"


def _wait(client: Client, job_id: str) -> Job:
    """Poll the job with a progress bar over its optimizer steps."""
    bar, last = None, 0

    def progress(job: Job, step_total) -> None:
        nonlocal bar, last
        if step_total is None:
            return
        step, total = step_total
        if bar is None:
            bar = click.progressbar(length=total, label=f"{job.id} training", file=sys.stderr)
            bar.__enter__()
        bar.update(step - last)
        last = step

    try:
        return client.fine_tuning.wait(job_id, poll_s=0.5, on_progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@finetune.command("create")
@click.option("--model", required=True, help="the base model, or one of your LoRA adapters to train further")
@click.option("--file", "train_path", type=click.Path(exists=True, dir_okay=False), help="JSONL to upload")
@click.option("--training-file", default=None, help="an uploaded file's id (instead of --file)")
@click.option("--validation-file", "valid_path", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--suffix", default=None)
@click.option("--epochs", "n_epochs", default="auto", show_default=True)
@click.option("--batch-size", default="auto", show_default=True)
@click.option("--lr-multiplier", default="auto", show_default=True)
@click.option("--peft-type", type=click.Choice(["LORA", "ROAD", "SHIRA"]), default="LORA", show_default=True)
@click.option("--rank", "r", type=int, default=8, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True,
              help="'all-linear', 'auto' (a probe ranks modules; needs --parameter-budget) or q_proj,v_proj,...")
@click.option("--parameter-budget", type=int, default=None, help="with --target-modules auto")
@click.option("--token-sparsity", type=float, default=None, help="TS-PEFT: share of token updates to skip")
@click.option("--token-threshold", type=click.Choice(["shared", "per_module"]), default="shared", show_default=True,
              help="TS-PEFT: one threshold over every module, or each module skipping --token-sparsity")
@click.option("--seed", type=int, default=None)
@click.option("--wait", is_flag=True, help="wait for the job, with a progress bar")
@_options
def finetune_create(client: Client, as_json: bool, model: str, train_path: str | None, training_file: str | None,
                    valid_path: str | None, suffix: str | None, n_epochs: str, batch_size: str, lr_multiplier: str,
                    peft_type: str, r: int, target_modules: str, parameter_budget: int | None,
                    token_sparsity: float | None, token_threshold: str, seed: int | None, wait: bool) -> None:
    """Start a fine-tuning job (uploading the files given as paths)."""
    if (train_path is None) == (training_file is None):
        raise click.UsageError("give exactly one of --file and --training-file")
    training_file = training_file or client.files.upload(train_path).id
    validation_file = client.files.upload(valid_path).id if valid_path else None

    def number(value: str):
        return value if value == "auto" else (float(value) if "." in value else int(value))

    job = client.fine_tuning.create(model, training_file, validation_file=validation_file, suffix=suffix, seed=seed,
                                    n_epochs=number(n_epochs), batch_size=number(batch_size),
                                    learning_rate_multiplier=number(lr_multiplier),
                                    adapter=_adapter_block(peft_type, r, target_modules, parameter_budget,
                                                           token_sparsity, token_threshold))
    if wait:
        job = _wait(client, job.id)
    _emit(job, as_json, _job_line(job))
    if wait and job.status != "succeeded":
        sys.exit(1)


def _adapter_block(peft_type: str, r: int, target_modules: str, parameter_budget: int | None,
                   token_sparsity: float | None, token_threshold: str = "shared") -> dict:
    block = {"peft_type": peft_type, "r": r, "target_modules": target_modules if target_modules in (
        "all-linear", "auto") else [m.strip() for m in target_modules.split(",") if m.strip()]}
    if parameter_budget is not None:
        block["parameter_budget"] = parameter_budget
    if token_sparsity is not None:
        block["token_selection"] = {"target_sparsity": token_sparsity, "threshold": token_threshold}
    return block


@finetune.command("ls")
@click.option("--limit", type=int, default=20, show_default=True)
@_options
def finetune_ls(client: Client, as_json: bool, limit: int) -> None:
    jobs = client.fine_tuning.list(limit=limit)
    _emit(jobs, as_json, "\n".join(_job_line(j) for j in jobs))


@finetune.command("status")
@click.argument("job_id")
@click.option("--wait", is_flag=True, help="wait for the job to end, with a progress bar")
@_options
def finetune_status(client: Client, as_json: bool, job_id: str, wait: bool) -> None:
    job = _wait(client, job_id) if wait else client.fine_tuning.get(job_id)
    _emit(job, as_json, _job_line(job))


@finetune.command("logs")
@click.argument("job_id")
@_options
def finetune_logs(client: Client, as_json: bool, job_id: str) -> None:
    """The job's events, oldest first."""
    events = list(reversed(client.fine_tuning.events(job_id)))
    _emit(events, as_json, "\n".join(f"{e.created_at}\t{e.level}\t{e.message}" for e in events))


@finetune.command("cancel")
@click.argument("job_id")
@_options
def finetune_cancel(client: Client, as_json: bool, job_id: str) -> None:
    _emit(client.fine_tuning.cancel(job_id), as_json, f"cancelled {job_id}")


COMMANDS = [generate, chat, models, adapters, finetune]
