"""How much fine-tuning work fits in the next step. Pure Python: no torch.

Inference comes first; fine-tuning gets what is left of the token budget. With an inter-token
latency SLO, the share is also bounded by time: a step is one inter-token interval for every
running decode, so the controller predicts the step's inference time from a running linear fit
(seconds = a + b * inference tokens, over recent inference-only steps), subtracts it from the
SLO (times a headroom), and converts the rest into fine-tuning work with a second fit of the
extra seconds a step takes per unit of fine-tuning work (forward: training tokens through all
layers; backward: token-layers), affine because each slice of work has a fixed cost too.
When no inference runs, fine-tuning takes the whole budget.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.9  # weight of the past in the running estimates
PROBE_EVERY = 16  # with inference and fine-tuning running together, one step in this many is inference-only


class _LinearFit:
    """Exponentially weighted least squares of y = a + b x."""

    def __init__(self):
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        d = DECAY
        self.w, self.sx, self.sy = d * self.w + 1, d * self.sx + x, d * self.sy + y
        self.sxx, self.sxy = d * self.sxx + x * x, d * self.sxy + x * y

    def affine(self) -> tuple[float, float] | None:
        """(a, b); while every sample had the same x, the proportional fit (0, mean y / mean x)."""
        if self.w == 0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > 1e-6 * max(1.0, mx * mx):
            slope = max(1e-12, (self.sxy / self.w - mx * my) / var)
            return max(0.0, my - slope * mx), slope
        return 0.0, max(1e-12, my / max(mx, 1e-9))

    def predict(self, x: float) -> float | None:
        fit = self.affine()
        return None if fit is None else fit[0] + fit[1] * x


@dataclass(frozen=True)
class TrainShareConfig:
    itl_slo_s: float | None  # None: fine-tuning always takes the leftover token budget
    headroom: float = 0.85  # aim below the SLO by this factor
    min_forward_tokens: int = 16  # progress guaranteed even when the SLO leaves no room
    initial_forward_tokens: int = 32  # before any measurement


class TrainShareController:
    def __init__(self, config: TrainShareConfig):
        self.config = config
        self.inference = _LinearFit()
        self.extra_seconds = {"forward": _LinearFit(), "backward": _LinearFit()}  # per unit of fine-tuning work
        self._mixed_steps = 0  # since the last inference-only step
        self._last_grant: dict[str, int] = {}  # units granted last time, per kind

    def needs_probe(self, inference_tokens: int) -> bool:
        """Skip fine-tuning this step to measure inference alone (keeps the fit current under co-serving)."""
        if self.config.itl_slo_s is None or inference_tokens == 0:
            return False
        return self._mixed_steps >= PROBE_EVERY or self.inference.w == 0

    def _spare_seconds(self, inference_tokens: int) -> float | None:
        predicted = self.inference.predict(inference_tokens)
        if predicted is None:
            return None
        return self.config.itl_slo_s * self.config.headroom - predicted

    def forward_tokens(self, inference_tokens: int, leftover_tokens: int) -> int:
        """Training tokens to forward this step, given the inference tokens already scheduled."""
        if leftover_tokens <= 0:
            return 0
        if inference_tokens == 0 or self.config.itl_slo_s is None:
            return leftover_tokens
        units = self._units("forward", inference_tokens, self.config.initial_forward_tokens)
        granted = max(min(self.config.min_forward_tokens, leftover_tokens), min(leftover_tokens, units))
        self._last_grant["forward"] = granted
        return granted

    def backward_stages(self, inference_tokens: int, pass_tokens: int, stages_left: int) -> int:
        """Backward stages (layers; the loss head counts as one) to run this step; at least one."""
        if inference_tokens == 0 or self.config.itl_slo_s is None:
            return stages_left
        units = self._units("backward", inference_tokens, pass_tokens)
        stages = max(1, min(stages_left, units // max(1, pass_tokens)))
        self._last_grant["backward"] = stages * pass_tokens
        return stages

    def _units(self, kind: str, inference_tokens: int, default: int) -> int:
        """The most units whose predicted extra time fits in the spare time. Cautious on both ends: the
        cost per unit is at least half the plain average (a noisy fit can make the slope look free), and
        a grant at most doubles the previous one of its kind (slow start). The previous grant is what was
        actually given, minimum included: a step with no room at all (units 0) must not pin every later
        grant to the minimum."""
        spare, extra = self._spare_seconds(inference_tokens), self.extra_seconds[kind]
        fit = extra.affine()
        if spare is None or fit is None:
            return default
        fixed, slope = fit
        average = extra.sy / max(extra.sx, 1e-9)
        units = int(max(0.0, spare - fixed) / max(slope, average / 2, 1e-12))
        return min(units, 2 * self._last_grant.get(kind, default))

    def observe(self, seconds: float, inference_tokens: int, kind: str | None = None, units: int = 0) -> None:
        """A finished step: inference-only steps refine the inference fit, others the cost per unit."""
        if kind is None or units <= 0:
            if inference_tokens > 0:
                self.inference.add(inference_tokens, seconds)
                self._mixed_steps = 0
            return
        self._mixed_steps += inference_tokens > 0
        base = self.inference.predict(inference_tokens) if inference_tokens else 0.0
        self.extra_seconds[kind].add(units, max(0.0, seconds - (base or 0.0)))
