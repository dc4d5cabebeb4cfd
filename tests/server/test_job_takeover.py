"""Jobs across replicas on one real Redis: kill -9 of the replica training a job hands the job to the
other replica (consumer group, idle timeout), which resumes from the last checkpoint; too many
deliveries fail a job with a reason; tenants see only their own files and jobs."""

from __future__ import annotations

import os
import re
import signal

import httpx
import openai

from coserve.adapters.embedded_redis import EmbeddedRedis
from coserve.adapters.store import AdapterStore, connect
from coserve.server.finetune.records import GROUP, FineTuneStore
from tests.server.conftest import start_server, wait_for
from tests.server.finetune_helpers import PAIRS, events, hyper, messages, pairs_file, wait_job
from tests.server.store_helpers import write_keys


def test_kill_9_of_the_training_replica_resumes_the_job_on_the_other(demo_tiny, tmp_path):
    with EmbeddedRedis(tmp_path / "shared-redis") as shared:
        common = ("--redis-url", shared.url, "--dtype", "float32", "--served-model-name", "demo-tiny",
                  "--job-claim-idle-s", "2")
        servers = [start_server(demo_tiny, tmp_path / name, *common) for name in ("a", "b")]
        try:
            client = openai.OpenAI(base_url=servers[0].base_url, api_key="unused", max_retries=0)
            file_id = pairs_file(client, padding="Longer prompts make each training step slower. " * 4)
            job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=file_id, suffix="takeover",
                                                 method=hyper(n_epochs=60, batch_size=4, lr=50),
                                                 extra_body={"adapter": {"checkpoint_every": 5}})
            assert wait_for(lambda: len(client.fine_tuning.jobs.checkpoints.list(job.id).data) >= 2, 60)
            started = next(m for m in messages(client, job.id) if "started on" in m)
            owner_pid = int(re.search(r"started on \S+-(\d+)-\w+ ", started).group(1))
            owner = next(s for s in servers if s.process.pid == owner_pid)
            survivor = next(s for s in servers if s is not owner)
            os.kill(owner_pid, signal.SIGKILL)
            owner.process.wait(10)
            client = openai.OpenAI(base_url=survivor.base_url, api_key="unused", max_retries=0)
            done = wait_job(client, job.id, timeout=240)
            assert done.status == "succeeded", done.error
            log = events(client, job.id)
            resumed = next(i for i, e in enumerate(log) if "resumed from its last checkpoint" in e.message)
            assert "(delivery 2)" in log[resumed].message
            steps = [e.data["step"] for e in log if e.type == "metrics" and "train_loss" in e.data]
            first_after = next(e.data["step"] for e in log[resumed:] if e.type == "metrics")
            checkpoints = {c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data}
            assert first_after - 1 in checkpoints  # continued right after a checkpoint
            assert steps[-1] == done.hyperparameters.n_epochs * 4
            for prompt, answer in PAIRS[:4]:
                out = client.completions.create(model=done.fine_tuned_model, temperature=0, max_tokens=6,
                                                prompt="Longer prompts make each training step slower. " * 4
                                                + prompt)
                assert out.choices[0].text == answer
        finally:
            for s in servers:
                s.stop()


def test_a_job_delivered_too_often_fails_with_a_reason(demo_tiny, tmp_path, redis_server):
    """A job whose consumer vanished after taking it (a replica that died at once) is taken over;
    with --job-max-deliveries 1 that second delivery fails it instead of training again."""
    prefix = "deliveries"
    records = FineTuneStore(connect(redis_server.url), prefix)
    srv = start_server(demo_tiny, tmp_path / "srv", "--redis-url", redis_server.url, "--store-prefix", prefix,
                       "--no-fine-tuning", "--served-model-name", "demo-tiny")
    try:
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0)
        job = client.fine_tuning.jobs.create(model="demo-tiny", training_file=pairs_file(client),
                                             method=hyper(n_epochs=1))
        records.ensure_group()
        assert records.r.xreadgroup(GROUP, "ghost", {records.queue: ">"}, count=1)  # taken, never processed
    finally:
        srv.stop()
    worker = start_server(demo_tiny, tmp_path / "worker", "--redis-url", redis_server.url, "--store-prefix",
                          prefix, "--job-max-deliveries", "1", "--job-claim-idle-s", "1",
                          "--served-model-name", "demo-tiny")
    try:
        client = openai.OpenAI(base_url=worker.base_url, api_key="unused", max_retries=0)
        failed = wait_job(client, job.id, timeout=60)
        assert failed.status == "failed" and failed.error.code == "job_interrupted", failed
        assert "interrupted 1 times" in failed.error.message and failed.fine_tuned_model is None
        assert records.r.xlen(records.queue) == 0  # acknowledged and removed
    finally:
        worker.stop()


def test_files_and_jobs_belong_to_their_tenant(demo_tiny, tmp_path, redis_server):
    keys = write_keys(tmp_path / "keys.yaml", {"ka": ("acme", "user"), "kb": ("bolt", "user")})
    srv = start_server(demo_tiny, tmp_path / "srv", "--redis-url", redis_server.url, "--store-prefix", "tenants",
                       "--api-keys-file", str(keys), "--served-model-name", "demo-tiny")
    try:
        acme = openai.OpenAI(base_url=srv.base_url, api_key="ka", max_retries=0)
        bolt = openai.OpenAI(base_url=srv.base_url, api_key="kb", max_retries=0)
        file_id = pairs_file(acme)
        job = acme.fine_tuning.jobs.create(model="demo-tiny", training_file=file_id, method=hyper(n_epochs=2))
        assert wait_job(acme, job.id).status == "succeeded"
        assert [f.id for f in bolt.files.list().data] == [] and bolt.fine_tuning.jobs.list().data == []
        own_missing = httpx.get(f"{srv.base_url}/fine_tuning/jobs/ftjob-nope", headers={"Authorization": "Bearer kb"})
        other = httpx.get(f"{srv.base_url}/fine_tuning/jobs/{job.id}", headers={"Authorization": "Bearer kb"})
        assert other.status_code == own_missing.status_code == 404
        assert other.json()["error"]["message"].replace(job.id, "X") == \
            own_missing.json()["error"]["message"].replace("ftjob-nope", "X")
        assert httpx.get(f"{srv.base_url}/files/{file_id}", headers={"Authorization": "Bearer kb"}).status_code == 404
        stolen = httpx.post(f"{srv.base_url}/fine_tuning/jobs", headers={"Authorization": "Bearer kb"},
                            json={"model": "demo-tiny", "training_file": file_id})
        assert stolen.status_code == 404 and stolen.json()["error"]["param"] == "training_file"
        done = acme.fine_tuning.jobs.retrieve(job.id)
        assert done.fine_tuned_model in {m.id for m in acme.models.list().data}
        assert done.fine_tuned_model not in {m.id for m in bolt.models.list().data}
        assert AdapterStore(connect(redis_server.url), "tenants").get("acme", done.fine_tuned_model) is not None
        assert httpx.get(srv.url + "/v1/files").status_code == 401
    finally:
        srv.stop()
