"""The peers users would pick instead of K-FAC (issue 19): Muon and SOAP, as their authors run them.

- ``muon``: ``torch.optim.Muon`` (Newton–Schulz orthogonalised momentum, Jordan et al. 2024) on the
  hidden 2-D weights, AdamW on everything else — embedding tables, the output head (the last
  ``nn.Linear`` of the model), norms, biases and weights that are not matrices (convolution kernels:
  torch's Muon takes 2-D parameters only). One learning rate drives both: Muon runs with
  ``adjust_lr_fn="match_rms_adamw"`` (Liu et al. 2025, "Muon is scalable"), which scales its
  orthogonal update to the RMS of an AdamW update, so that the AdamW learning rate and weight
  decay are the right ones for both parts and a tuning grid has one lr axis.
- ``soap``: SOAP (Vyas et al. 2024, Adam in the eigenbasis of Shampoo's factors) from the
  ``pytorch-optimizer`` package, an optional extra (``pip install -e '.[peers]' -c constraints.txt``);
  refused with that command when it is missing. The package's defaults otherwise (betas
  (0.95, 0.95), preconditioner every 10 steps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SOAP_MISSING = (
    "optimizer 'soap' needs the pytorch-optimizer package, an optional extra: "
    "pip install -e '.[peers]' -c constraints.txt (the constraint keeps the CPU torch)"
)


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's parameters, AdamW's): the trainable 2-D weights that are neither an embedding table
    nor the output head's weight, and all the rest."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1].weight if linears else None
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        is_hidden = p.dim() == 2 and p is not head and id(p) not in tables
        (hidden if is_hidden else rest).append(p)
    return hidden, rest


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices and AdamW on the rest, stepped as one optimizer.

    ``param_groups`` are the two inner optimizers' groups (the trainer's per-step learning rate
    reaches both); ``state_dict`` holds both states.
    """

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        hidden, rest = muon_split(model)
        if not hidden:
            raise ValueError(
                "optimizer 'muon' found no hidden 2-D weight in the model (it leaves the head and embeddings to AdamW)"
            )
        self.muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr, weight_decay=weight_decay) if rest else None
        super().__init__([*hidden, *rest], {"lr": lr})
        self.param_groups = self.muon.param_groups + (self.adamw.param_groups if self.adamw is not None else [])

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [self.muon] + ([self.adamw] if self.adamw is not None else [])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner():
            inner.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for inner in self._inner():
            inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": None if self.adamw is None else self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])


def soap(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """pytorch-optimizer's SOAP on every trainable parameter."""
    try:
        from pytorch_optimizer import SOAP  # type: ignore[import-not-found,unused-ignore]
    except ImportError as error:
        raise RuntimeError(SOAP_MISSING) from error
    return SOAP([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
