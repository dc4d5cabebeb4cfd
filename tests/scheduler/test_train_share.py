"""The fine-tuning share controller against a simulated step-time model (no torch)."""

from __future__ import annotations

import pytest

from coserve.scheduler.train_share import PROBE_EVERY, TrainShareConfig, TrainShareController

OVERHEAD, PER_INFERENCE_TOKEN, PER_TRAIN_TOKEN, PER_BACKWARD_UNIT = 0.010, 0.0004, 0.0009, 0.00005


def step_seconds(inference_tokens: int, kind: str | None, units: int) -> float:
    cost = {"forward": PER_TRAIN_TOKEN, "backward": PER_BACKWARD_UNIT, None: 0.0}[kind]
    return OVERHEAD + PER_INFERENCE_TOKEN * inference_tokens + cost * units


def run(controller: TrainShareController, steps: int, inference_tokens: int, pass_tokens: int = 512):
    """Alternate forward and backward work as the trainer would; returns the step times."""
    times = []
    for i in range(steps):
        if controller.needs_probe(inference_tokens):
            kind, units = None, 0
        elif i % 2 == 0:
            kind, units = "forward", controller.forward_tokens(inference_tokens, 2048 - inference_tokens)
        else:
            kind = "backward"
            units = controller.backward_stages(inference_tokens, pass_tokens, 31) * pass_tokens
        seconds = step_seconds(inference_tokens, kind, units)
        controller.observe(seconds, inference_tokens, kind, units)
        times.append(seconds)
    return times


def test_steps_converge_under_the_slo_and_training_keeps_progressing():
    controller = TrainShareController(TrainShareConfig(itl_slo_s=0.100))
    times = run(controller, 400, inference_tokens=32)
    assert max(times[50:]) <= 0.100
    forward = controller.forward_tokens(32, 2016)
    # the share fills most of the spare time: (0.085 - 0.0228) / 0.0009 ~ 69 tokens
    assert 50 <= forward <= 75
    assert controller.backward_stages(32, 512, 31) >= 1


def test_idle_inference_gives_fine_tuning_the_whole_budget():
    controller = TrainShareController(TrainShareConfig(itl_slo_s=0.050))
    run(controller, 50, inference_tokens=16)
    assert controller.forward_tokens(0, 2048) == 2048
    assert controller.backward_stages(0, 512, 31) == 31
    assert not controller.needs_probe(0)


def test_without_an_slo_fine_tuning_takes_the_leftover_tokens():
    controller = TrainShareController(TrainShareConfig(itl_slo_s=None))
    assert controller.forward_tokens(100, 412) == 412
    assert controller.backward_stages(100, 512, 31) == 31


def test_a_tight_slo_still_leaves_minimal_progress():
    controller = TrainShareController(TrainShareConfig(itl_slo_s=0.020))
    run(controller, 100, inference_tokens=64)  # inference alone already takes 0.0356 s
    assert controller.forward_tokens(64, 1984) == controller.config.min_forward_tokens
    assert controller.backward_stages(64, 512, 31) == 1


def test_inference_alone_is_probed_regularly_under_co_serving():
    controller = TrainShareController(TrainShareConfig(itl_slo_s=0.100))
    assert controller.needs_probe(32)  # nothing measured yet
    probes = 0
    for _ in range(200):
        if controller.needs_probe(32):
            probes += 1
            controller.observe(step_seconds(32, None, 0), 32)
        else:
            controller.observe(step_seconds(32, "forward", 40), 32, "forward", 40)
    assert probes == pytest.approx(200 / (PROBE_EVERY + 1), abs=2)


def test_work_measured_as_free_does_not_break_the_fit():
    controller = TrainShareController(TrainShareConfig(itl_slo_s=0.100))
    for _ in range(20):
        controller.observe(0.030, 32)
        controller.observe(0.020, 32, "forward", 16)  # faster than inference alone: zero extra time
    grants = [controller.forward_tokens(32, 1000) for _ in range(6)]
    assert grants == [64, 128, 256, 512, 1000, 1000]  # grows by doubling (slow start) up to the leftover


def test_a_grant_at_most_doubles_the_previous_one():
    controller = TrainShareController(TrainShareConfig(itl_slo_s=1.0))
    run(controller, 40, inference_tokens=8)
    controller._last_grant["forward"] = 10  # as if the last grant had been small
    assert controller.forward_tokens(8, 2040) == 20


def test_grants_recover_after_a_burst_leaves_no_room():
    """A burst of inference that fills the SLO grants the minimum; once it passes, grants grow back to fill
    the spare time (slow start from the minimum actually granted, not from zero)."""
    controller = TrainShareController(TrainShareConfig(itl_slo_s=0.100))
    run(controller, 100, inference_tokens=32)
    run(controller, 40, inference_tokens=230)  # inference alone ~0.102 s: no room for fine-tuning
    assert controller.forward_tokens(230, 1818) == controller.config.min_forward_tokens
    assert controller.backward_stages(230, 512, 31) == 1
    run(controller, 60, inference_tokens=32)
    assert 50 <= controller.forward_tokens(32, 2016) <= 75  # (0.085 - 0.0228) / 0.0009 ~ 69 tokens
    assert controller.backward_stages(32, 512, 31) >= 2  # (0.085 - 0.0228) / (512 * 0.00005) ~ 2.4 stages
