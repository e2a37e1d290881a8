"""Optimizers of the training loop: AdamW alone, or Muon on the hidden matrices with AdamW on the rest.

    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))

Muon (Keller Jordan, 2024; `torch.optim.Muon`) orthogonalises the momentum of each 2-D weight matrix inside the
transformer blocks with a few Newton-Schulz iterations; embeddings, the LM head and every gain or bias stay with
AdamW, as in modded-nanogpt and nanochat. Both optimizers live in one `MuonWithAdamW` object that the loop treats
like any torch optimizer: `param_groups` (the loop sets each group's lr to the schedule's lr times its
`lr_scale`), `step`, `zero_grad`, `state_dict` and `load_state_dict` (both optimizers' state, so a resumed run
continues bit for bit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ownllm.config import TrainConfig


def _decay_groups(params: list[nn.Parameter], model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on norms, biases and embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if not (p.dim() >= 2 and id(p) not in embeddings)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict[str, Any]], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type in ("cuda", "cpu"))


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the transformer blocks (attention and MLP matrices): what Muon optimises."""
    inner = getattr(model, "module", model)  # under DDP
    blocks = getattr(inner, "blocks", None)
    if blocks is None:
        return []
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


class MuonWithAdamW:
    """Muon for `muon_params`, AdamW for `adamw_groups`, stepped together as one optimizer."""

    def __init__(self, muon_params: list[nn.Parameter], adamw_groups: list[dict[str, Any]], config: TrainConfig,
                 device: torch.device) -> None:
        self.muon = torch.optim.Muon(muon_params, lr=config.muon_lr, momentum=config.muon_momentum,
                                     weight_decay=config.weight_decay, adjust_lr_fn="original")
        for group in self.muon.param_groups:
            group["lr_scale"] = config.muon_lr / config.lr
        self.adamw = _adamw(adamw_groups, config, device)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ownllm.errors import OwnLLMError

        if set(state) != {"adamw", "muon"}:
            raise OwnLLMError("the checkpoint's optimizer state is not Muon + AdamW (was the run trained with "
                              "--optimizer adamw? resume it with the optimizer it was trained with)")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> Any:
    """The optimizer `config.optimizer` names over the parameters that train (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer != "muon":
        return _adamw(_decay_groups(params, model, config.weight_decay), config, device)
    muon_params = hidden_matrices(model)
    muon_ids = {id(p) for p in muon_params}
    rest = [p for p in params if id(p) not in muon_ids]
    if not muon_params:
        return _adamw(_decay_groups(rest, model, config.weight_decay), config, device)
    return MuonWithAdamW(muon_params, _decay_groups(rest, model, config.weight_decay), config, device)
