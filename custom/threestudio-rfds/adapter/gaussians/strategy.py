"""gsplat's densification strategies, chosen and checked from a config block, and the optimizer
views they need (docs/gaussians.md §6).  Nothing here densifies: gsplat's
``DefaultStrategy`` / ``MCMCStrategy`` do."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
from torch import Tensor

from ...checks import check_choice
from ...splats.params import PARAM_NAMES
from ...splats.render import require_gsplat
from ..config_keys import check_config_keys, dataclass_keys

STRATEGY_TYPES = ("default", "mcmc")


def make_strategy(kind: str, options: Mapping[str, Mapping[str, Any]]):
    """``gsplat.strategy.DefaultStrategy(**options["default"])`` or
    ``MCMCStrategy(**options["mcmc"])``: ``options`` holds one block per strategy, so switching
    ``kind`` needs no other change.  An unknown kind, block or option is a one-line error naming it
    and what is allowed."""
    check_choice("system.strategy_type", kind, STRATEGY_TYPES)
    check_config_keys("system.strategy", STRATEGY_TYPES, options)
    gsplat = require_gsplat()
    cls = gsplat.DefaultStrategy if kind == "default" else gsplat.MCMCStrategy
    chosen = dict((options or {}).get(kind) or {})
    check_config_keys(f"system.strategy.{kind} ({cls.__name__})", dataclass_keys(cls), chosen)
    return cls(**chosen)


def is_mcmc(strategy) -> bool:
    return type(strategy).__name__ == "MCMCStrategy"


def initial_state(strategy, scene_scale: float) -> Dict[str, Any]:
    """The strategy's running state (DefaultStrategy takes the scene scale its thresholds scale by)."""
    return strategy.initialize_state() if is_mcmc(strategy) else strategy.initialize_state(scene_scale=scene_scale)


def post_backward(strategy, params, views: Mapping[str, "GroupView"], state: Dict[str, Any], step: int,
                  info: Dict[str, Any]) -> None:
    """``strategy.step_post_backward`` with what each strategy takes: MCMC the means' learning
    rate (its noise scale), Default the (unpacked) layout of ``info``."""
    if is_mcmc(strategy):
        strategy.step_post_backward(params, views, state, step, info, lr=views["means"].param_groups[0]["lr"])
    else:
        strategy.step_post_backward(params, views, state, step, info, packed=False)


class GroupView:
    """One parameter group of a shared optimizer seen as the one-group optimizer gsplat's strategies
    expect: they replace ``param_groups[0]["params"]`` and move ``state`` entries, which then
    happens in the real optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict):
        self.optimizer = optimizer
        self.param_groups = [group]

    @property
    def state(self):
        return self.optimizer.state


def splat_group_views(optimizer: torch.optim.Optimizer, prefix: str = "geometry.splats.") -> Dict[str, GroupView]:
    """{splat name: view} for the groups named ``<prefix><name>`` (looked up now: loading an
    optimizer state dict replaces the group dicts)."""
    groups = {g.get("name"): g for g in optimizer.param_groups}
    return {name: GroupView(optimizer, groups[prefix + name]) for name in PARAM_NAMES}


def check_splat_groups(optimizer: torch.optim.Optimizer, splats: Mapping[str, Tensor],
                       prefix: str = "geometry.splats.") -> None:
    """Each splat parameter must have its own group, named ``<prefix><name>``, holding it alone."""
    groups = {g.get("name"): g for g in optimizer.param_groups}
    missing: List[str] = [prefix + n for n in PARAM_NAMES if prefix + n not in groups]
    if missing:
        raise ValueError(f"system.optimizer.params must give each splat parameter its own entry; missing "
                         f"{missing} (gsplat's strategies densify each parameter with its own optimizer state)")
    for name in PARAM_NAMES:
        params = groups[prefix + name]["params"]
        if len(params) != 1 or params[0] is not splats[name]:
            raise ValueError(f"system.optimizer.params.{prefix + name} must hold exactly that parameter")


def state_to(state: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    """The running state with its tensors on ``device`` (a checkpoint holds them on the CPU)."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state.items()}
