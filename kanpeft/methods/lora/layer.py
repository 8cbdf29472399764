"""HF peft LoRA layer for :class:`KANConv` (registered with ``LoraConfig._register_custom_module``).

The low-rank update ``B @ A`` lives on the layer's fused weight, the weight over the
channel-major stack ``[base_act(x), basis_0(x), ...]`` of every input channel (shape
``(out, in/groups * (n_basis + 1), *kernel)``): one adapter covers both branches and all degrees.
It follows peft's conventions (``lora_A``/``lora_B`` dicts, ``merge``/``unmerge``/
``get_delta_weight``), so ``save_pretrained``, ``set_adapter`` and ``merge_and_unload`` work.
"""
from __future__ import annotations

from math import prod
from typing import Any

from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from kanseg.layers import KANConv

from ..common import call_layer


class LoraKANConv(nn.Module, LoraLayer):
    """LoRA on the fused weight of a KANConv (the update is applied in weight space)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        if config.lora_dropout:
            raise ValueError("LoRA on KANConv is applied in weight space: lora_dropout must be 0")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        layer: KANConv = module
        in_features = (layer.in_channels // layer.groups) * layer.n_expanded * prod(layer.kernel_size)
        return in_features, layer.out_channels

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``scaling * B @ A`` reshaped to the fused weight's shape."""
        layer: KANConv = self.get_base_layer()
        delta = self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]
        return delta.view(layer.out_channels, -1, *layer.kernel_size)

    def _split(self, fused: Tensor) -> tuple[Tensor | None, Tensor]:
        """Split a fused-layout weight into its base and basis parts."""
        layer: KANConv = self.get_base_layer()
        if layer.base_weight is None:
            return None, fused
        v = fused.view(layer.out_channels, -1, layer.n_expanded, *layer.kernel_size)
        return v[:, :, 0], v[:, :, 1:].flatten(1, 2)

    def _apply_delta(self, adapter: str, sign: float) -> None:
        layer: KANConv = self.get_base_layer()
        base, basis = self._split(self.get_delta_weight(adapter).detach())
        layer.basis_weight.data += sign * basis.to(layer.basis_weight.dtype)
        if base is not None:
            layer.base_weight.data += sign * base.to(layer.base_weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or named) adapters' updates to the base weights."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter in self.lora_A:
                if safe_merge and not self.get_delta_weight(adapter).isfinite().all():
                    raise ValueError(f"NaNs in adapter {adapter!r}: not merging it")
                self._apply_delta(adapter, 1.0)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract the merged adapters' updates again."""
        while self.merged_adapters:
            self._apply_delta(self.merged_adapters.pop(), -1.0)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        layer: KANConv = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return layer(x)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not adapters:
            return layer(x)
        base, basis = self._split(sum(self.get_delta_weight(a) for a in adapters))
        tensors = {"basis_weight": layer.basis_weight + basis}
        if base is not None:
            tensors["base_weight"] = layer.base_weight + base
        return call_layer(layer, x, tensors)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
