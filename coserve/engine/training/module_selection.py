"""`target_modules: "auto"`: which modules a job trains, chosen by learned token density.

A short probe run trains the job's adapter on every linear module of every layer with token
selection and one shared threshold (token_gate.py): the adapter as a whole skips the target share
of token updates, and each module keeps the share of its tokens whose relative update
||M(x)|| / ||W0 x|| clears the common bar. A module that training pushes hard keeps many tokens; one
it barely uses keeps few (TS-PEFT's finding: learned token sparsity ranks module importance). The
job then trains, from a fresh start, only the densest modules whose parameters fit the budget:
modules are taken in density order, and one that would overrun the budget is passed over for the
next one that fits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from coserve.adapters.types import TARGET_MODULES, BaseModelShape, module_path
from coserve.engine.training.params import AdapterSpec, parameter_count

PROBE_SPARSITY = 0.5  # target sparsity of the probe when the job itself trains densely


@dataclass(frozen=True)
class RankedModule:
    module: str  # "model.layers.3.mlp.down_proj"
    token_density: float  # share of token updates the probe applied (second half of the probe)
    parameters: int  # trainable parameters it costs under the job's adapter spec
    selected: bool


@dataclass(frozen=True)
class ModuleSelection:
    """The probe's ranking, kept with the job (its `module_selection` field and an event)."""

    probe_steps: int
    parameter_budget: int
    selected_parameters: int
    ranking: list[RankedModule]  # densest first

    def parts(self) -> tuple[str, ...]:
        """The selected modules as "layer:module" keys (AdapterSpec.target_parts)."""
        return tuple(f"{m.module.split('.')[2]}:{m.module.split('.')[-1]}" for m in self.ranking if m.selected)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModuleSelection:
        return cls(data["probe_steps"], data["parameter_budget"], data["selected_parameters"],
                   [RankedModule(**m) for m in data["ranking"]])


def probe_adapter(spec: AdapterSpec) -> AdapterSpec:
    """The probe trains the job's kind of adapter on every module, gated with one shared threshold."""
    return replace(spec, target_modules=TARGET_MODULES, target_parts=None, shared_threshold=True,
                   target_sparsity=spec.target_sparsity or PROBE_SPARSITY)


def module_costs(spec: AdapterSpec, shape: BaseModelShape) -> dict[str, int]:
    """"layer:module" -> trainable parameters, for every linear module of the base model."""
    return {f"{layer}:{module}": parameter_count(spec, *shape.module_shapes[module])
            for layer in range(shape.num_layers) for module in TARGET_MODULES}


def select_modules(density: dict[str, float], costs: dict[str, int], budget: int,
                   probe_steps: int) -> ModuleSelection:
    """Rank every module of `costs` by token density (a module the probe never gated counts as 0;
    ties in model order) and select greedily within `budget` parameters."""
    ranked = sorted(costs, key=lambda key: -density.get(key, 0.0))  # stable: ties stay in model order
    used, ranking = 0, []
    for key in ranked:
        fits = used + costs[key] <= budget
        used += costs[key] if fits else 0
        layer, module = key.split(":")
        ranking.append(RankedModule(module_path(int(layer), module), round(density.get(key, 0.0), 4),
                                    costs[key], fits))
    return ModuleSelection(probe_steps, budget, used, ranking)
