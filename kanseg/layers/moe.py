"""Mixture of KAN convolution experts with sparse top-k gating (torch-conv-kan's MoE convs).

Gating, as torch-conv-kan (after Shazeer et al. 2017, "Outrageously large neural networks"):
the input is averaged over its spatial dims, ``logits = pooled @ w_gate``; in training with
``noisy_gating`` Gaussian noise of std ``softplus(pooled @ w_noise) + 0.01`` is added. The
gates are the ``top_k`` largest softmax probabilities, renormalised (divided by their sum +
1e-6), and zero for the other experts; eval mode is deterministic. The output is
``sum_e gate_e * expert_e(x)``, each sample running only through its selected experts.

Load-balancing loss (torch-conv-kan's): ``loss_coef * (cv2(importance) + cv2(load))``, with
``cv2`` the squared coefficient of variation over experts, ``importance`` the gates summed over
the batch and ``load`` the number of samples per expert, or, in noisy training with
``top_k < experts``, the smooth estimate sum over samples of P(expert in the top k under fresh
noise). As in torch-conv-kan, that estimate compares the clean logits with thresholds taken
from the noisy softmax *probabilities* (its k-th and (k+1)-th largest).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .bottleneck import KANBottleneckConv

#: layer options of :func:`kanseg.layers.create_kan_conv` that make a mixture of experts
MOE_OPTIONS = ("moe_experts", "moe_top_k", "moe_noisy_gating", "moe_loss_coef", "moe_inner")


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation: unbiased variance / (mean^2 + 1e-10); 0 for one value."""
    x = x.float()
    if x.numel() == 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def _prob_in_top_k(clean: Tensor, noisy: Tensor, noise_std: Tensor, top: Tensor,
                   k: int) -> Tensor:
    """P(each logit stays in the top ``k`` under fresh noise), torch-conv-kan's estimate: the
    thresholds are the (k+1)-th / k-th largest noisy probabilities ``top`` (B, k+1)."""
    threshold_in, threshold_out = top[:, k:k + 1], top[:, k - 1:k]
    prob_in = torch.special.ndtr((clean - threshold_in) / noise_std)
    prob_out = torch.special.ndtr((clean - threshold_out) / noise_std)
    return torch.where(noisy > threshold_in, prob_in, prob_out)


@contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers on exit: a recomputed forward must not update running
    statistics a second time."""
    buffers = list(module.buffers())
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


def _weighted_expert(expert: nn.Module, x: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """``weights * expert(x[rows])``, one weight per selected sample."""
    out = expert(x.index_select(0, rows))
    return out * weights.to(out.dtype).view((-1,) + (1,) * (out.dim() - 1))


class _AddRows(torch.autograd.Function):
    """``out.index_add_(0, rows, source)`` keeping only ``rows`` for backward (autograd's
    ``index_add_`` keeps ``source`` too: one more copy of every expert's output)."""

    @staticmethod
    def forward(ctx, out: Tensor, rows: Tensor, source: Tensor) -> Tensor:
        ctx.save_for_backward(rows)
        ctx.mark_dirty(out)
        return out.index_add_(0, rows, source)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor]:
        (rows,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, rows)


class MoEKANConv(nn.Module):
    """Sparse top-k mixture of equally shaped KAN convs (any family, 1D/2D/3D, plain or
    bottleneck): see the module docstring for the gating and the load-balancing loss.

    ``auxiliary_loss()`` returns ``loss_coef`` times the load-balancing loss of the last
    training forward (None after an eval forward). ``recompute=True`` keeps only the input,
    the routing and the gates for backward: each expert's forward is recomputed there (buffers
    such as batch-norm running statistics are not updated twice). ``gate_input``: an optional
    module applied to the pooled input before the gate (torch-conv-kan's ``pregate``).
    Gate weights start at zero, as in torch-conv-kan.
    """

    auxiliary_kind = "load_balance"

    def __init__(self, experts: Sequence[nn.Module], top_k: int = 2, noisy_gating: bool = True,
                 loss_coef: float = 1e-2, recompute: bool = True,
                 gate_input: nn.Module | None = None):
        super().__init__()
        experts = list(experts)
        shapes = {(e.spatial_dims, e.in_channels, e.out_channels) for e in experts}
        if len(shapes) != 1:
            raise ValueError(f"MoEKANConv needs one or more experts of one shape "
                             f"(spatial_dims, in_channels, out_channels), got {sorted(shapes)}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(experts):
            raise ValueError(f"moe_top_k must be an integer in [1, {len(experts)}] (the number "
                             f"of experts), got {top_k!r}")
        self.spatial_dims, self.in_channels, self.out_channels = shapes.pop()
        self.groups = getattr(experts[0], "groups", 1)
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k
        self.noisy_gating = noisy_gating
        self.loss_coef = loss_coef
        self.recompute = recompute
        self.gate_input = gate_input
        self.w_gate = nn.Parameter(torch.zeros(self.in_channels, len(experts)))
        self.w_noise = nn.Parameter(torch.zeros(self.in_channels, len(experts)))
        self._loss: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def gate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(gates (B, experts), load (experts,))`` for ``x``; noisy in training. Computed in
        the gate weights' dtype, outside autocast (routing should not depend on AMP)."""
        with torch.autocast(x.device.type, enabled=False):
            pooled = x.flatten(2).mean(-1, dtype=self.w_gate.dtype)
            if self.gate_input is not None:
                pooled = self.gate_input(pooled)
            clean = pooled @ self.w_gate
            noisy = self.noisy_gating and self.training
            if noisy:
                noise_std = F.softplus(pooled @ self.w_noise) + 1e-2
                logits = clean + torch.randn_like(clean) * noise_std
            else:
                logits = clean
            probs = logits.softmax(1)
            top, index = probs.topk(min(self.top_k + 1, self.num_experts), dim=1)
            chosen = top[:, :self.top_k]
            gates = torch.zeros_like(probs).scatter(
                1, index[:, :self.top_k], chosen / (chosen.sum(1, keepdim=True) + 1e-6))
            if noisy and self.top_k < self.num_experts:
                load = _prob_in_top_k(clean, logits, noise_std, top, self.top_k).sum(0)
            else:
                load = (gates > 0).sum(0).to(gates.dtype)
        return gates, load

    def load_balancing_loss(self, gates: Tensor, load: Tensor) -> Tensor:
        """``loss_coef * (cv2(gates summed over the batch) + cv2(load))``."""
        return self.loss_coef * (cv_squared(gates.sum(0)) + cv_squared(load))

    def auxiliary_loss(self) -> Tensor | None:
        """The load-balancing loss of the last training forward (None after eval)."""
        return self._loss

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"MoEKANConv expected input of shape (B, {self.in_channels}, "
                f"{', '.join(['*'] * self.spatial_dims)}), got {tuple(x.shape)}")
        gates, load = self.gate(x)
        self._loss = self.load_balancing_loss(gates, load) if self.training else None
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return self.dense(x, gates)  # a trace must not bake in this input's routing
        return self.sparse(x, gates)

    def sparse(self, x: Tensor, gates: Tensor) -> Tensor:
        """Each expert on the samples whose gate for it is > 0, weighted and summed."""
        selected = gates > 0
        counts = selected.sum(0).tolist()
        expert_index, rows = selected.t().nonzero(as_tuple=True)
        weights = gates[rows, expert_index]
        y = None
        for expert, expert_rows, w in zip(self.experts, rows.split(counts), weights.split(counts)):
            if expert_rows.numel() == 0:
                continue
            if self.recompute and torch.is_grad_enabled():
                term = checkpoint(_weighted_expert, expert, x, expert_rows, w,
                                  use_reentrant=False,
                                  context_fn=lambda e=expert: (nullcontext(), _buffers_kept(e)))
            else:
                term = _weighted_expert(expert, x, expert_rows, w)
            if y is None:
                y = term.new_zeros((x.shape[0],) + term.shape[1:])
            y = _AddRows.apply(y, expert_rows, term)
        return self.dense(x, gates) if y is None else y  # no finite gate: let NaNs show

    def dense(self, x: Tensor, gates: Tensor) -> Tensor:
        """Every expert on every sample, weighted by its gate (zero when not selected)."""
        rows = torch.arange(x.shape[0], device=x.device)
        return torch.stack([_weighted_expert(expert, x, rows, gates[:, e])
                            for e, expert in enumerate(self.experts)]).sum(0)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_loss"] = None  # a graph's output cannot be deep-copied or pickled
        return state

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, "
                f"noisy_gating={self.noisy_gating}, loss_coef={self.loss_coef}, "
                f"recompute={self.recompute}")


def _copies(layer: nn.Module, n: int) -> list[nn.Module]:
    return [layer] + [copy.deepcopy(layer) for _ in range(n - 1)]


def mixture_of_experts(layer: nn.Module, moe_experts: int, moe_top_k: int = 2,
                       moe_noisy_gating: bool = True, moe_loss_coef: float = 1e-2,
                       moe_inner: bool = False) -> nn.Module:
    """``layer`` as a :class:`MoEKANConv` of ``moe_experts`` copies of itself (torch-conv-kan
    starts them equal); with ``moe_inner``, the bottleneck ``layer`` with only its inner basis
    conv made a mixture (torch-conv-kan's ``MoEBottleNeckKAGNConv``; experts start apart)."""
    if isinstance(moe_experts, bool) or not isinstance(moe_experts, int) or moe_experts < 1:
        raise ValueError(f"moe_experts must be a positive integer (0 or null: no mixture), "
                         f"got {moe_experts!r}")
    gating = dict(top_k=moe_top_k, noisy_gating=bool(moe_noisy_gating),
                  loss_coef=float(moe_loss_coef))
    core = getattr(layer, "core", layer)
    if not moe_inner:
        return MoEKANConv(_copies(layer, moe_experts), recompute=core.recompute, **gating)
    if not isinstance(layer, KANBottleneckConv):
        raise ValueError("moe_inner=True mixes the inner conv of bottleneck convs: it needs "
                         "bottleneck=True")
    experts = _copies(core, moe_experts)
    for expert in experts[1:]:
        expert.reset_parameters()
    layer.core = MoEKANConv(experts, recompute=core.recompute, **gating)
    return layer


__all__ = ["MOE_OPTIONS", "MoEKANConv", "cv_squared", "mixture_of_experts"]
