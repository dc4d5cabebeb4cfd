"""Fine-tuning over HTTP with the openai SDK's files and fine_tuning clients: a job learns, its adapter
is served at once, downloads into peft with the same outputs; bad files and requests get 4xx naming
the field; cancel; inference keeps its exact outputs while a job trains."""

from __future__ import annotations

import re
import threading

import httpx
import openai
import pytest
from safetensors.torch import load_file

from tests.server.conftest import start_server
from tests.server.finetune_helpers import PAIRS, hyper, jsonl, messages, metrics, pairs_file, wait_job
from tests.server.store_helpers import PROMPT, extract_tar, peft_reference


@pytest.fixture(scope="module")
def ft_server(demo_tiny, tmp_path_factory):
    srv = start_server(demo_tiny, tmp_path_factory.mktemp("ft"), "--dtype", "float32", "--served-model-name",
                       "demo-tiny")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(ft_server):
    return openai.OpenAI(base_url=ft_server.base_url, api_key="unused", max_retries=0)


def test_a_job_learns_its_pairs_and_the_adapter_is_served_at_once(client, ft_server, tmp_path):
    file_id = pairs_file(client)
    job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=file_id, suffix="colors", seed=7,
                                         method=hyper(n_epochs=20), extra_body={"adapter": {"r": 8}})
    assert job.status in ("validating_files", "queued") and job.hyperparameters.n_epochs == 20
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:demo-tiny:colors:{job.id}" and job.trained_tokens > 0
    curve = [m["train_loss"] for m in metrics(client, job.id) if "train_loss" in m]
    assert len(curve) == 80 and curve[-1] < 0.1 and curve[0] > 1.0
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data] == [70, 60, 50, 40, 30,
                                                                                              20, 10]
    assert job.fine_tuned_model in {m.id for m in client.models.list().data}
    exposition = httpx.get(ft_server.url + "/metrics").text
    trained = re.search(r'^coserve_fine_tuning_tokens_total\{model_name="demo-tiny"\} (\S+)$', exposition, re.M)
    assert trained and float(trained.group(1)) >= job.trained_tokens
    assert re.search(r'^coserve_fine_tuning_jobs\{model_name="demo-tiny"\} 0.0$', exposition, re.M)

    for prompt, answer in PAIRS:  # greedy answers are the trained ones
        out = client.completions.create(model=job.fine_tuned_model, prompt=prompt, max_tokens=6, temperature=0)
        assert (out.choices[0].text, out.choices[0].finish_reason) == (answer, "stop")

    # the downloaded PEFT directory, in transformers + peft, gives the served tokens and log-probabilities
    raw = httpx.get(f"{ft_server.base_url}/adapters/{job.fine_tuned_model}/download", timeout=30)
    assert raw.status_code == 200, raw.text
    adapter_dir = extract_tar(raw.content, tmp_path / "ft")
    tokens, logprobs = peft_reference(ft_server.model_dir, adapter_dir, PROMPT)
    served = httpx.post(f"{ft_server.base_url}/completions", timeout=60, json={
        "model": job.fine_tuned_model, "prompt": PROMPT, "max_tokens": len(tokens), "temperature": 0,
        "ignore_eos": True, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert served["token_logprobs"] == pytest.approx(logprobs, abs=2e-3)
    assert len(served["tokens"]) == len(tokens)


def test_chat_examples_train_on_assistant_turns(client):
    rows = [{"messages": [{"role": "system", "content": "Answer with one color."},
                          {"role": "user", "content": f"Color of {w}?"},
                          {"role": "assistant", "content": c.strip()}]} for w, c in PAIRS[:8]]
    file_id = client.files.create(file=("chat.jsonl", jsonl(rows)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=file_id, suffix="chat",
                                         method=hyper(n_epochs=25, batch_size=4))
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    answers = [client.chat.completions.create(model=job.fine_tuned_model, temperature=0, max_tokens=8, messages=[
        {"role": "system", "content": "Answer with one color."}, {"role": "user", "content": f"Color of {w}?"}])
        .choices[0].message.content for w, _ in PAIRS[:8]]
    assert answers == [c.strip() for _, c in PAIRS[:8]]


def test_bad_files_name_the_line(ft_server):
    url = ft_server.base_url + "/files"
    cases = {
        b'{"prompt": "a", "completion": "b"}\nnot json\n': "line 2: not valid JSON",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n': "line 2: `completion` must be a string",
        b'{"messages": [{"role": "user", "content": "hi"}]}': "line 1: the conversation has no assistant message",
        b'{"messages": [{"role": "wizard", "content": "hi"}]}': "line 1: messages[0].role must be one of",
        b'[1, 2]': "line 1: each line must be a JSON object",
        b"\xff\xfe": "not UTF-8",
        b"\n\n": "holds no examples",
    }
    for body, message in cases.items():
        resp = httpx.post(url, files={"file": ("t.jsonl", body)}, data={"purpose": "fine-tune"})
        assert resp.status_code == 400 and message in resp.json()["error"]["message"], (body, resp.text)
        assert resp.json()["error"]["param"] == "file"
    resp = httpx.post(url, files={"file": ("t.jsonl", b'{"prompt": "a", "completion": "b"}')},
                      data={"purpose": "assistants"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "purpose"


def test_bad_job_requests_name_the_field(client, ft_server):
    file_id = pairs_file(client)
    url = ft_server.base_url + "/fine_tuning/jobs"
    good = {"model": "demo-tiny", "training_file": file_id}
    cases = [
        ({"training_file": "file-missing"}, 404, "training_file"),
        ({"validation_file": "file-missing"}, 404, "validation_file"),
        ({"model": "no-such-model"}, 404, "model"),
        ({"method": hyper(0)}, 400, "method.supervised.hyperparameters.n_epochs"),
        ({"method": hyper(2, lr=-1)}, 400, "method.supervised.hyperparameters.learning_rate_multiplier"),
        ({"adapter": {"r": 999}}, 400, "adapter.r"),
        ({"adapter": {"peft_type": "ROAD", "group_size": 48}}, 400, "adapter.group_size"),
        ({"adapter": {"peft_type": "IA3"}}, 400, "adapter.peft_type"),
        ({"adapter": {"target_modules": ["lm_head"]}}, 400, "adapter.target_modules"),
        ({"suffix": "bad suffix!"}, 400, "suffix"),
        ({"unknown": 1}, 400, "unknown"),
    ]
    jobs_before = len(client.fine_tuning.jobs.list(limit=100).data)
    for change, status, param in cases:
        resp = httpx.post(url, json={**good, **change})
        assert resp.status_code == status and resp.json()["error"]["param"] == param, (change, resp.text)
    assert len(client.fine_tuning.jobs.list(limit=100).data) == jobs_before  # nothing was created
    assert httpx.get(url + "/ftjob-nope").status_code == 404
    assert httpx.post(url + "/ftjob-nope/cancel").status_code == 404


def test_cancel_leaves_no_adapter_and_the_next_job_runs(client):
    file_id = pairs_file(client, padding="Some context to make every step longer. " * 6)
    job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=file_id, suffix="cancel",
                                         method=hyper(n_epochs=100, batch_size=1))
    assert wait_job(client, job.id, until=("running",)).status == "running"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)  # already ended
    later = client.fine_tuning.jobs.create(model="demo-tiny", training_file=pairs_file(client), suffix="after",
                                           method=hyper(n_epochs=1))
    assert wait_job(client, later.id).status == "succeeded"
    job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    models = {m.id for m in client.models.list().data}
    assert not any(job.id in m for m in models) and later.id in " ".join(models)
    assert "The job was cancelled" in messages(client, job.id)


def test_inference_outputs_are_unchanged_while_a_job_trains(client):
    prompts = [f"Tell me about {w}" for w in ("ships", "rain", "code", "bread")]

    def answers() -> list[str]:
        return [client.completions.create(model="demo-tiny", prompt=p, max_tokens=16, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

    alone = answers()
    file_id = pairs_file(client, padding="Context that makes training steps longer. " * 4)
    job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=file_id, suffix="co",
                                         method=hyper(n_epochs=30))
    assert wait_job(client, job.id, until=("running",)).status == "running"
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(answers())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    during = client.fine_tuning.jobs.retrieve(job.id)
    assert results == [alone] * 3
    assert during.status == "running", "the job ended before inference ran alongside it"
    assert wait_job(client, job.id).status == "succeeded"


def test_a_token_selective_job_round_trips_with_its_thresholds(client, ft_server, tmp_path):
    job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=pairs_file(client), suffix="ts",
                                    method=hyper(n_epochs=8), extra_body={"adapter": {
                                        "r": 8, "token_selection": {"target_sparsity": 0.5}}})
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    last = [m for m in metrics(client, job.id) if "train_loss" in m][-1]
    assert 0.3 <= last["token_sparsity"] <= 0.7 and "q_proj" in last["token_sparsity_per_module"]
    raw = httpx.get(f"{ft_server.base_url}/adapters/{job.fine_tuned_model}/download", timeout=30).content
    folder = extract_tar(raw, tmp_path / "ts")
    assert "coserve_token_selection" in (folder / "adapter_config.json").read_text()
    assert "Plain peft ignores that key" in (folder / "README.md").read_text()
    again = httpx.post(f"{ft_server.base_url}/adapters", data={"name": "ts-again"},
                       files={"archive": ("ts.tar.gz", raw)}, timeout=60)
    assert again.status_code == 201, again.text

    def text(model: str) -> str:
        return client.completions.create(model=model, prompt=PAIRS[3][0], max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text

    assert text("ts-again") == text(job.fine_tuned_model)
    bad = httpx.post(f"{ft_server.base_url}/fine_tuning/jobs", json={
        "model": "demo-tiny", "training_file": pairs_file(client), "adapter": {"token_selection": {
            "target_sparsity": 1.5}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "adapter.token_selection.target_sparsity"
    bad = httpx.post(f"{ft_server.base_url}/fine_tuning/jobs", json={
        "model": "demo-tiny", "training_file": pairs_file(client), "adapter": {"token_selection": {
            "target_sparsity": 0.5, "threshold": "global"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "adapter.token_selection.threshold"


def test_auto_target_modules_probe_ranks_and_trains_the_densest_within_budget(client, ft_server, tmp_path):
    job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=pairs_file(client), suffix="auto",
                                         method=hyper(n_epochs=6), extra_body={"adapter": {
                                             "r": 8, "target_modules": "auto", "parameter_budget": 6000,
                                             "probe_steps": 6}})
    job = wait_job(client, job.id)
    assert job.status == "succeeded", job.error
    selection = job.to_dict()["module_selection"]
    ranking = selection["ranking"]
    assert len(ranking) == 2 * 7 and selection["probe_steps"] == 6 and selection["parameter_budget"] == 6000
    densities = [m["token_density"] for m in ranking]
    assert densities == sorted(densities, reverse=True) and densities[0] > densities[-1]
    chosen = {m["module"] for m in ranking if m["selected"]}
    assert 0 < len(chosen) < 14
    assert sum(m["parameters"] for m in ranking if m["selected"]) == selection["selected_parameters"] <= 6000
    probe = [m for m in metrics(client, job.id) if m.get("phase") == "probe"]
    assert [m["step"] for m in probe] == list(range(1, 7))
    assert any(m.startswith(f"Selected {len(chosen)} of 14 modules") for m in messages(client, job.id))

    # the adapter adapts exactly the selected modules, and peft serves it as coserve does
    raw = httpx.get(f"{ft_server.base_url}/adapters/{job.fine_tuned_model}/download", timeout=30)
    folder = extract_tar(raw.content, tmp_path / "auto")
    names = load_file(folder / "adapter_model.safetensors")
    assert {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in names} == chosen
    tokens, logprobs = peft_reference(ft_server.model_dir, folder, PROMPT)
    served = httpx.post(f"{ft_server.base_url}/completions", timeout=60, json={
        "model": job.fine_tuned_model, "prompt": PROMPT, "max_tokens": len(tokens), "temperature": 0,
        "ignore_eos": True, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert served["token_logprobs"] == pytest.approx(logprobs, abs=2e-3)


def test_auto_target_modules_needs_a_fitting_budget(client, ft_server):
    url, file_id = ft_server.base_url + "/fine_tuning/jobs", pairs_file(client)
    cases = [({"target_modules": "auto"}, "adapter.parameter_budget"),
             ({"target_modules": "auto", "parameter_budget": 100}, "adapter.parameter_budget"),
             ({"parameter_budget": 5000}, "adapter.parameter_budget"),
             ({"target_modules": "auto", "parameter_budget": 5000, "probe_steps": 1}, "adapter.probe_steps")]
    for adapter, param in cases:
        resp = httpx.post(url, json={"model": "demo-tiny", "training_file": file_id, "adapter": adapter})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (adapter, resp.text)
    resp = httpx.post(url, json={"model": "some-adapter", "training_file": file_id,
                                 "adapter": {"target_modules": "auto", "parameter_budget": 5000}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "adapter.target_modules", resp.text
    assert "smallest module's 768 parameters" in httpx.post(url, json={
        "model": "demo-tiny", "training_file": file_id,
        "adapter": {"target_modules": "auto", "parameter_budget": 100}}).json()["error"]["message"]
