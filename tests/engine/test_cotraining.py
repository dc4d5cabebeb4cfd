"""Fine-tuning jobs inside LLMEngine steps: a fixed seed repeats, a checkpoint resumes the same run,
a failing job fails alone while inference goes on, inference rows and training rows share steps."""

from __future__ import annotations

import pytest
import torch

from coserve.engine.engine import EngineConfig, LLMEngine
from coserve.engine.training.dataset import Example, tokenize
from coserve.engine.training.params import AdapterSpec
from coserve.engine.training.trainer import TrainingJobSpec, TrainSample
from coserve.scheduler.request import SamplingParams
from tests.conftest import run_engine
from tests.server.finetune_helpers import PAIRS


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", kv_cache_memory=1 << 24, **kw))


def _samples(engine: LLMEngine) -> list[TrainSample]:
    eos = min(engine.eos_token_ids)
    return [tokenize(engine.tokenizer, Example(i, {"prompt": p, "completion": a}), eos, 256)
            for i, (p, a) in enumerate(PAIRS)]


def _spec(engine, **kw) -> TrainingJobSpec:
    args = dict(job_id="job", base_model="demo", adapter=AdapterSpec("LORA", r=8), train=_samples(engine),
                n_epochs=3, batch_size=4, learning_rate=1e-2, seed=5, checkpoint_every=4, microbatch_tokens=40)
    return TrainingJobSpec(**{**args, **kw})


def _train(engine: LLMEngine, spec: TrainingJobSpec) -> list:
    events = []
    engine.submit_training(spec, events.append)
    for _ in range(100_000):
        if not engine.has_work:
            break
        engine.step()
    return events


def _final_tensors(events) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    done = [e for e in events if e.kind == "succeeded"]
    assert done, [e.kind for e in events]
    return load(done[0].files[1])


def test_a_fixed_seed_gives_the_same_adapter(demo_tiny):
    first = _final_tensors(_train(_engine(demo_tiny), _spec(_engine(demo_tiny))))
    second = _final_tensors(_train(_engine(demo_tiny), _spec(_engine(demo_tiny))))
    other = _final_tensors(_train(_engine(demo_tiny), _spec(_engine(demo_tiny), seed=6)))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_resuming_from_a_checkpoint_continues_the_same_run(demo_tiny):
    engine = _engine(demo_tiny)
    whole = _train(engine, _spec(engine))
    checkpoint = next(e for e in whole if e.kind == "checkpoint" and e.data["step"] == 8)
    resumed = _train(_engine(demo_tiny), _spec(engine, resume=checkpoint.payload))
    losses = {e.data["step"]: e.data["train_loss"] for e in whole if e.kind == "metrics" and "train_loss" in e.data}
    after = {e.data["step"]: e.data["train_loss"] for e in resumed if e.kind == "metrics" and "train_loss" in e.data}
    assert sorted(after) == list(range(9, 13))  # the loss curve continues at step 9
    for step, loss in after.items():
        assert loss == pytest.approx(losses[step], rel=1e-5)
    a, b = _final_tensors(whole), _final_tensors(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_failing_job_fails_alone_and_inference_goes_on(demo_tiny):
    engine = _engine(demo_tiny)
    expected = run_engine(_engine(demo_tiny), {"r": ([5, 6, 7], SamplingParams(max_tokens=12, temperature=0,
                                                                                ignore_eos=True))})
    bad = _samples(engine)
    bad[3] = TrainSample(bad[3].token_ids + [10**6], bad[3].loss_mask + [True])  # a token past the vocabulary
    events = []
    engine.submit_training(_spec(engine, train=bad, job_id="bad", batch_size=16), events.append)
    got = run_engine(engine, {"r": ([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))})
    assert got == expected
    failed = [e for e in events if e.kind == "failed"]
    assert len(failed) == 1 and failed[0].data["code"] == "training_error", [e.kind for e in events]
    good = _train(engine, _spec(engine, job_id="next", n_epochs=1))  # the engine takes the next job
    assert good[-1].kind == "succeeded"


def test_training_rows_join_inference_steps_and_leave_inference_outputs_alone(demo_tiny):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    requests = {f"r{i}": ([3 + i, 9, 27, 81 % (7 + i)], params) for i in range(4)}
    alone = run_engine(_engine(demo_tiny), requests)
    engine = _engine(demo_tiny, itl_slo_ms=1000.0)
    events = []
    engine.submit_training(_spec(engine, n_epochs=30), events.append)
    mixed_steps = 0
    original = engine.runner.execute

    def counting(step, train=None):
        nonlocal mixed_steps
        mixed_steps += bool(train is not None and step.sequences)
        return original(step, train)

    engine.runner.execute = counting
    together = run_engine(engine, requests)
    assert together == alone
    assert mixed_steps > 5  # fine-tuning chunks shared forwards with decodes
    while engine.has_work:
        engine.step()
    assert events[-1].kind == "succeeded"


def test_a_pass_forwarded_in_chunks_recomputes_its_layers_and_learns_the_same(demo_tiny, monkeypatch):
    """A micro-batch forwarded over several steps (here: a 16-token step budget against 40-token passes) runs
    its chunks without autograd and re-runs each layer over the whole pass at backward; a pass forwarded in
    one step keeps its graph. Both train the same adapter."""
    from coserve.engine.training import coforward

    recomputed = []
    original = coforward._recomputed_layer_backward

    def counting(model, adapter, state, i):
        recomputed.append(i)
        return original(model, adapter, state, i)

    monkeypatch.setattr(coforward, "_recomputed_layer_backward", counting)
    engine = _engine(demo_tiny)
    whole = _final_tensors(_train(engine, _spec(engine, n_epochs=1)))
    assert recomputed == []
    chunked_engine = _engine(demo_tiny, max_batch_tokens=16)
    chunked = _final_tensors(_train(chunked_engine, _spec(chunked_engine, n_epochs=1)))
    layers = chunked_engine.model.config.num_hidden_layers
    assert recomputed and recomputed[:layers] == list(reversed(range(layers)))
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-4, atol=1e-5, msg=k)
