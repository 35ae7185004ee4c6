"""Cox negative partial log-likelihood over the slides of a batch (Breslow's ties).

Cox, "Regression models and life-tables", JRSS-B 1972; Breslow 1974 for tied times. The
loss MIL survival models (e.g. ABMIL with a Cox head, as in the Prov-GigaPath / TITAN
survival baselines) train on::

    L(eta) = - sum_{i: event_i} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]

where ``eta`` are the model's risk scores (log relative hazards): every slide whose time
is at least ``t_i`` - tied times included - is in the risk set of the event at ``t_i``.
A batch without an event carries no information: the loss is 0 (with a gradient of 0).

Example::

    loss = cox_ph_loss(model(x, mask)[:, 0], time, event, reduction="sum") / len(time)
"""

from __future__ import annotations

import torch


def cox_ph_loss(
    risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor:
    """``risk``, ``time``, ``event`` (n,); ``reduction`` ``"sum"`` (over events) or
    ``"mean"`` (per event)."""
    if risk.ndim != 1 or time.shape != risk.shape or event.shape != risk.shape:
        raise ValueError(
            f"risk, time and event must be (n,) alike, got {tuple(risk.shape)}, "
            f"{tuple(time.shape)}, {tuple(event.shape)}"
        )
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    event = event.to(torch.bool)
    n_events = int(event.sum())
    if n_events == 0:
        return risk.sum() * 0.0
    order = torch.argsort(time, descending=True, stable=True)
    t, e, h = time[order], event[order], risk[order]
    lse = torch.logcumsumexp(h, dim=0)  # log-sum over everyone with a time >= this one's
    # ties: the risk set of t_i is every j with t_j >= t_i, i.e. up to its group's last member
    end = torch.searchsorted(-t.contiguous(), -t.contiguous(), right=True) - 1
    loss = -(h - lse[end])[e].sum()
    return loss / n_events if reduction == "mean" else loss
