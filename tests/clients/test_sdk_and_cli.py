"""coserve's Python client (sync and async) and CLI against a live server: streaming, adapters from
disk and from a PeftModel in memory, a fine-tuning job waited on, errors and retries; two replicas
on one Redis with an adapter pushed by the CLI on one and used through the SDK on the other."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from coserve.adapters.embedded_redis import EmbeddedRedis
from coserve.cli import main as cli
from coserve.clients import AsyncClient, Client, CoserveError, extract_adapter
from tests.adapters.conftest import make_adapter
from tests.server.conftest import start_server
from tests.server.finetune_helpers import PAIRS, jsonl
from tests.server.store_helpers import PROMPT, peft_text, write_keys


@pytest.fixture(scope="module")
def live(demo_tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    keys = write_keys(tmp / "keys.yaml", {"key-a": ("acme", "user"), "key-slow": ("slowco", "user")},
                      rates={"key-slow": 1.0})
    srv = start_server(demo_tiny, tmp / "srv", "--dtype", "float32", "--served-model-name", "demo-tiny",
                       "--api-keys-file", str(keys), "--rate-limit-burst", "2")
    yield srv
    srv.stop()


@pytest.fixture
def client(live):
    with Client(live.url, "key-a") as c:
        yield c


def run_cli(live, *args: str, key: str = "key-a"):
    return CliRunner().invoke(cli, list(args), env={"COSERVE_URL": live.url, "COSERVE_API_KEY": key})


def test_completions_and_chat_stream_and_match(client):
    full = client.complete("demo-tiny", "Hello", max_tokens=12, temperature=0, ignore_eos=True)
    streamed = list(client.complete("demo-tiny", "Hello", stream=True, max_tokens=12, temperature=0,
                                    ignore_eos=True))
    assert "".join(c.text for c in streamed) == full.text and full.usage["completion_tokens"] == 12
    assert streamed[-1].finish_reason == "length"
    messages = [{"role": "user", "content": "Name a color"}]
    chat = client.chat("demo-tiny", messages, max_tokens=8, temperature=0)
    assert "".join(c.text for c in client.chat("demo-tiny", messages, stream=True, max_tokens=8,
                                               temperature=0)) == chat.text
    assert client.models()[0].id == "demo-tiny"


def test_adapters_from_disk_and_from_a_peft_model_in_memory(client, demo_tiny, tmp_path):
    on_disk = make_adapter(demo_tiny, "lora-all", tmp_path / "disk", seed=3)
    record = client.adapters.upload("from-disk", on_disk)
    assert (record.id, record.version, record.method) == ("from-disk", 1, "LORA")
    torch.manual_seed(4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_tiny, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert client.adapters.upload("in-memory", model).rank == 4
    model.save_pretrained(tmp_path / "saved")
    for name, directory in (("from-disk", on_disk), ("in-memory", tmp_path / "saved")):
        served = client.complete(name, PROMPT, max_tokens=24, temperature=0, ignore_eos=True).text
        assert served == peft_text(demo_tiny, directory), name
    pulled = extract_adapter(client.adapters.download("in-memory"), tmp_path / "pulled")
    assert (pulled / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "saved" / "adapter_model.safetensors").read_bytes()
    assert {a.id for a in client.adapters.list()} >= {"from-disk", "in-memory"}
    client.adapters.delete("in-memory")
    with pytest.raises(CoserveError) as err:
        client.complete("in-memory", "x", max_tokens=2)
    assert err.value.status == 404 and err.value.param == "model"


def test_a_fine_tuning_job_waited_on_with_progress(client):
    file = client.files.upload(jsonl([{"prompt": p, "completion": a} for p, a in PAIRS]), filename="t.jsonl")
    assert file.examples == len(PAIRS)
    job = client.fine_tuning.create("demo-tiny", file.id, suffix="sdk", n_epochs=20, batch_size=4,
                                    learning_rate_multiplier=50)
    seen = []
    job = client.fine_tuning.wait(job.id, poll_s=0.1, on_progress=lambda j, p: seen.append((j.status, p)))
    assert job.status == "succeeded" and job.fine_tuned_model.endswith(job.id)
    assert seen[-1] == ("succeeded", (80, 80))
    assert client.complete(job.fine_tuned_model, PAIRS[0][0], max_tokens=6, temperature=0).text == PAIRS[0][1]
    assert any("successfully completed" in e.message for e in client.fine_tuning.events(job.id))
    assert client.fine_tuning.list()[0].id == job.id


def test_async_client(live):
    async def run():
        async with AsyncClient(live.url, "key-a") as client:
            text = "".join([c.text async for c in client.complete("demo-tiny", "Hello", stream=True, max_tokens=6,
                                                                   temperature=0, ignore_eos=True)])
            full = await client.complete("demo-tiny", "Hello", max_tokens=6, temperature=0, ignore_eos=True)
            models = await client.models()
            with pytest.raises(CoserveError):
                await client.fine_tuning.get("ftjob-missing")
            return text, full.text, [m.id for m in models]

    streamed, full, models = asyncio.run(run())
    assert streamed == full and models[0] == "demo-tiny"


def test_429_is_retried_honouring_retry_after(live):
    impatient = Client(live.url, "key-slow", max_retries=0)
    with pytest.raises(CoserveError) as err:
        for _ in range(6):
            impatient.models()
    assert err.value.status == 429
    patient = Client(live.url, "key-slow", max_retries=5)
    assert all(patient.models() for _ in range(4))  # each 429 waited out (Retry-After) and retried


def test_cli_commands_and_exit_codes(live, demo_tiny, tmp_path):
    result = run_cli(live, "models", "--json")
    assert result.exit_code == 0 and json.loads(result.output)[0]["id"] == "demo-tiny"
    result = run_cli(live, "generate", "demo-tiny", "Hello", "--max-tokens", "5", "--temperature", "0")
    assert result.exit_code == 0 and result.output.strip()
    adapter = make_adapter(demo_tiny, "road", tmp_path / "road", seed=8)
    result = run_cli(live, "adapters", "push", "cli-road", str(adapter))
    assert result.exit_code == 0 and "cli-road version 1 (ROAD" in result.output
    assert "cli-road" in run_cli(live, "adapters", "ls").output
    result = run_cli(live, "adapters", "pull", "cli-road", str(tmp_path / "pulled"))
    assert result.exit_code == 0 and (tmp_path / "pulled" / "adapter_config.json").is_file()
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl([{"prompt": p, "completion": a} for p, a in PAIRS[:4]]))
    result = run_cli(live, "finetune", "create", "--model", "demo-tiny", "--file", str(data), "--epochs", "2",
                     "--target-modules", "v_proj,q_proj", "--token-sparsity", "0.5", "--token-threshold", "per_module",
                     "--wait", "--json")
    assert result.exit_code == 0, result.output
    job = json.loads(result.output[result.output.index("{"):])
    assert job["status"] == "succeeded"
    assert job["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["adapter"]["token_selection"] == {"target_sparsity": 0.5, "threshold": "per_module"}
    logs = run_cli(live, "finetune", "logs", job["id"])
    assert "The job has successfully completed" in logs.output
    assert job["id"] in run_cli(live, "finetune", "ls").output
    assert run_cli(live, "adapters", "rm", "cli-road").exit_code == 0
    missing = run_cli(live, "generate", "cli-road", "x")
    assert missing.exit_code == 1 and "404" in missing.output and "does not exist" in missing.output
    denied = run_cli(live, "models", key="wrong-key")
    assert denied.exit_code == 1 and "401" in denied.output
    cancel = run_cli(live, "finetune", "cancel", job["id"])
    assert cancel.exit_code == 1 and "already ended" in cancel.output
    console = subprocess.run([sys.executable, "-m", "coserve.cli", "models", "--url", live.url, "--api-key",
                              "key-a"], capture_output=True, text=True, timeout=120)
    assert console.returncode == 0 and console.stdout.splitlines()[0] == "demo-tiny"
    assert f"ft:demo-tiny::{job['id']}  (adapter of demo-tiny)" in console.stdout


def test_two_replicas_cli_push_on_one_sdk_on_the_other(demo_tiny, tmp_path):
    adapter = make_adapter(demo_tiny, "lora-all", tmp_path / "bot", seed=30)
    with EmbeddedRedis(tmp_path / "redis") as shared:
        common = ("--redis-url", shared.url, "--dtype", "float32", "--served-model-name", "demo-tiny")
        a = start_server(demo_tiny, tmp_path / "a", *common)
        b = start_server(demo_tiny, tmp_path / "b", *common)
        try:
            pushed = CliRunner().invoke(cli, ["adapters", "push", "bot", str(adapter), "--url", a.url])
            assert pushed.exit_code == 0, pushed.output
            expected = peft_text(demo_tiny, adapter)
            with Client(b.url) as on_b, Client(a.url) as on_a:
                assert on_b.complete("bot", PROMPT, max_tokens=24, temperature=0, ignore_eos=True).text == expected
                for replica in (on_a, on_b):  # traffic through both
                    assert replica.complete("demo-tiny", "Hi", max_tokens=4).usage["completion_tokens"] == 4
        finally:
            a.stop()
            b.stop()
