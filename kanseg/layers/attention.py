"""Self-KAN-attention and KAN focal modulation (torch-conv-kan's ``attention_conv.py``), generic
over 1D/2D/3D and over the KAN family: every q/k/v/projection convolution comes from
:func:`~kanseg.layers.builder.create_kan_conv`, so a variant is a ``family`` (and ``bottleneck``)
argument, not a class.

Submodule names follow torch-conv-kan (``proj_q``, ``proj_k``, ``proj_v``, ``inner_proj``,
``outer_proj``, ``gamma``, ``norm_layer``; ``f``, ``h``, ``proj``, ``focal_layers``) so that
checkpoint keys map one to one. With ``recompute=True`` (the default) the body of a layer runs
under activation checkpointing: backward keeps the input only and recomputes the rest, and
batch-norm running statistics are restored after the recomputation so they are updated once.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .builder import create_kan_conv
from .errors import OptionError
from .factories import conv_module, create_norm

#: output norms of the attention layer: those of ``create_norm`` plus ``channel_layer`` (a
#: LayerNorm over the channels of every position, timm's ``LayerNorm2d`` in any dims)
ATTENTION_NORMS = ("instance", "batch", "group", "layer", "channel_layer", "none")
ROPE_MODES = ("mixed", "axial")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each position of ``(B, C, *S)`` (timm's ``LayerNorm2d``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def create_attention_norm(name: str | None, spatial_dims: int, channels: int,
                          affine: bool = True) -> nn.Module:
    """A norm of :data:`ATTENTION_NORMS` (``channel_layer`` has timm's eps, 1e-6)."""
    if name == "channel_layer":
        return ChannelLayerNorm(channels, eps=1e-6, elementwise_affine=affine)
    return create_norm(name, spatial_dims, channels, affine=affine)


class _BuffersRestored:
    """Context that puts ``module``'s buffers (batch-norm running statistics) back as they were
    on entry; reusable, as a recomputation may run more than once (``retain_graph``)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(buf, buf.clone()) for buf in self.module.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: torch's CPU batch / instance norm
    backward is wrong for batch-1 gradients with channels-last strides (torch 2.14), which the
    token-major view of q, k and v would hand back to their convs."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def run_recomputed(module: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn(x)``; with ``module.recompute`` and autograd on, under activation checkpointing
    (backward keeps ``x`` only; running statistics are not updated twice)."""
    if not (module.recompute and torch.is_grad_enabled()) or torch.jit.is_tracing() \
            or torch.compiler.is_compiling():
        return fn(x)
    return checkpoint(fn, x, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _BuffersRestored(module)))


def rope_positions(tokens: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(x, y) positions of tokens ``1 .. tokens-1`` on a raster ``sqrt(tokens - 1)`` wide.

    torch-conv-kan's RoPE treats token 0 as a class token (left unrotated) and the others as a
    square grid, whatever the feature map's shape; the same float32 arithmetic is used here.
    """
    width = math.sqrt(max(tokens - 1, 0))
    t = torch.arange(max(tokens - 1, 0), dtype=torch.float32, device=device)
    return t % width, torch.div(t, width, rounding_mode="floor")


class RotaryEmbedding(nn.Module):
    """2D rotary position embedding of the channel pairs ``(2i, 2i+1)`` of q and k.

    Token ``t`` at position ``(x, y)`` (:func:`rope_positions`) rotates pair ``i`` by
    ``x * freqs[0, i] + y * freqs[1, i]``. ``mixed``: learned frequencies, initialised per axis
    with a random rotation (RoPE-Mixed); ``axial``: fixed, the first half of the pairs turns
    with ``x`` and the second with ``y`` (RoPE-Axial). ``channels`` must be a multiple of 4.
    """

    def __init__(self, channels: int, theta: float = 10.0, mode: str = "mixed"):
        super().__init__()
        if mode not in ROPE_MODES:
            raise OptionError("rope", f"rope must be one of {ROPE_MODES} or None, got {mode!r}")
        if channels % 4:
            raise OptionError("rope", f"RoPE needs channels divisible by 4, got {channels}")
        self.mode = mode
        mag = 1.0 / theta ** (torch.arange(0, channels, 4)[: channels // 4].float() / channels)
        if mode == "mixed":
            angle = torch.rand(1) * 2 * math.pi
            fx = torch.cat([mag * torch.cos(angle), mag * torch.cos(math.pi / 2 + angle)])
            fy = torch.cat([mag * torch.sin(angle), mag * torch.sin(math.pi / 2 + angle)])
            self.freqs = nn.Parameter(torch.stack([fx, fy]))
        else:
            zeros = torch.zeros_like(mag)
            self.register_buffer("freqs", torch.stack([torch.cat([mag, zeros]),
                                                       torch.cat([zeros, mag])]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate tokens ``1..`` of ``x`` ``(B, N, C)``; token 0 passes unchanged."""
        t_x, t_y = (t.to(self.freqs.dtype) for t in rope_positions(x.shape[1], x.device))
        angle = torch.outer(t_x, self.freqs[0]) + torch.outer(t_y, self.freqs[1])
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        a, b = x[:, 1:].unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
        return torch.cat([x[:, :1], rotated], dim=1)


class KANSelfAttention(nn.Module):
    """Self-attention over all positions with KAN-convolution q, k and v (torch-conv-kan's
    ``SelfKANtentionND``): ``norm_layer(gamma * x + outer_proj(attention(q, k, v)))``.

    ``att = inner_proj(x)`` (a 1x1 conv to ``inner_channels``, or ``x``); ``q, k, v`` are
    'same'-padded KAN convs of ``att``; per head, ``out_i = sum_j softmax_j(q_i . k_j * s) v_j``
    over positions ``i, j``. torch-conv-kan's form is one head and ``s = 1`` (``scaled=False``);
    ``scaled=True`` gives ``s = 1 / sqrt(channels per head)``. ``gamma`` starts at 0.
    ``rope`` (``"mixed"``/``"axial"``) rotates q and k (:class:`RotaryEmbedding`).
    ``norm`` and ``affine`` are those of the q/k/v convs and of the output norm
    (``channel_layer``, torch-conv-kan's default output norm in 2D: instance-normed convs);
    ``family_options`` go to every q/k/v conv (``degree``, ``dropout``...). ``qkv``, when
    given, builds each of q, k and v from the attention width instead (a 'same'-size module,
    e.g. RDNet's KAN conv + channel LayerNorm unit); ``family`` and the conv options then go
    unused.
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int = 2,
        family: str = "kagn",
        kernel_size: int = 3,
        inner_channels: int | None = None,
        heads: int = 1,
        scaled: bool = False,
        rope: str | None = None,
        rope_theta: float = 10.0,
        norm: str = "batch",
        affine: bool = True,
        groups: int = 1,
        dilation: int = 1,
        bottleneck: bool = False,
        dim_reduction: float = 4.0,
        recompute: bool = True,
        qkv: Callable[[int], nn.Module] | None = None,
        **family_options,
    ):
        super().__init__()
        if norm not in ATTENTION_NORMS:
            raise OptionError("norm", f"norm must be one of {ATTENTION_NORMS}, got {norm!r}")
        width = inner_channels or channels
        if heads < 1 or width % heads:
            raise OptionError("heads", f"heads must divide the attention width {width}, "
                                       f"got {heads!r}")
        self.spatial_dims = spatial_dims
        self.channels, self.heads, self.recompute = channels, heads, recompute
        self.scale = 1.0 / math.sqrt(width // heads) if scaled else 1.0
        if kernel_size % 2 == 0:
            raise OptionError("kernel_size", f"kernel_size must be odd ('same' padding), "
                                             f"got {kernel_size!r}")
        conv_norm = "instance" if norm == "channel_layer" else norm
        self.inner_proj = self.outer_proj = None
        if inner_channels is not None:
            conv = conv_module(spatial_dims)
            self.inner_proj = conv(channels, inner_channels, 1)
            self.outer_proj = conv(inner_channels, channels, 1)
        self.proj_q, self.proj_k, self.proj_v = (
            qkv(width) if qkv is not None else
            create_kan_conv(family, spatial_dims, width, width, kernel_size,
                            padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                            groups=groups, bottleneck=bottleneck, dim_reduction=dim_reduction,
                            norm=conv_norm, affine=affine, recompute=recompute,
                            **family_options)
            for _ in range(3))
        self.rope = None if rope is None else RotaryEmbedding(width, rope_theta, rope)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.norm_layer = create_attention_norm(norm, spatial_dims, channels, affine)

    def attend(self, x: Tensor) -> Tensor:
        """``outer_proj(attention(q, k, v))`` of ``x`` (the layer without residual and norm)."""
        att = x if self.inner_proj is None else self.inner_proj(x)
        q, k, v = (_ContiguousGrad.apply(proj(att)).flatten(2).transpose(1, 2)
                   for proj in (self.proj_q, self.proj_k, self.proj_v))  # (B, N, C)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, N, C/heads)
        out = out.transpose(1, 2).flatten(2).transpose(1, 2).unflatten(2, att.shape[2:])
        out = out.contiguous()
        return out if self.outer_proj is None else self.outer_proj(out)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(f"KANSelfAttention expected input (B, {self.channels}, "
                             f"{self.spatial_dims} spatial dims), got {tuple(x.shape)}")
        return self.norm_layer(self.gamma * x + run_recomputed(self, self.attend, x))


def focal_kernel_sizes(focal_window: int, focal_level: int, focal_factor: int) -> list[int]:
    """Kernel size of each focal level: ``focal_factor * level + focal_window``."""
    return [focal_factor * level + focal_window for level in range(focal_level)]


class KANFocalModulation(nn.Module):
    """Focal modulation with KAN convs (torch-conv-kan's ``KANFocalModulationND``).

    ``q, ctx, gates = split(f(x))``; level ``l`` applies a depthwise KAN conv of kernel
    ``focal_factor * l + focal_window`` to ``ctx`` and accumulates ``ctx_l * gate_l``; the
    global mean of the sum, times the last gate, is added; the sum is divided by
    ``focal_level + 1`` (``normalize_modulator``); the output is
    ``proj(post_norm(q * h(ctx_all)))``. ``f``, ``h`` and ``proj`` are 1x1 KAN convs
    (``full_kan=False``: ``f`` and ``h`` are plain 1x1 convs). ``post_norm`` is the norm name
    after the modulation (None: none); ``norm``/``affine``/``family_options`` go to every KAN
    conv; ``bottleneck`` applies to ``f``, ``h`` and ``proj`` (the focal convs stay plain).
    """

    def __init__(
        self,
        channels: int,
        spatial_dims: int = 2,
        family: str = "kagn",
        focal_window: int = 3,
        focal_level: int = 2,
        focal_factor: int = 2,
        post_norm: str | None = "batch",
        normalize_modulator: bool = True,
        full_kan: bool = True,
        norm: str = "batch",
        affine: bool = True,
        bottleneck: bool = False,
        dim_reduction: float = 4.0,
        recompute: bool = True,
        **family_options,
    ):
        super().__init__()
        if focal_level < 1:
            raise OptionError("focal_level", f"focal_level must be >= 1, got {focal_level!r}")
        self.spatial_dims, self.channels = spatial_dims, channels
        self.focal_level, self.normalize_modulator = focal_level, normalize_modulator
        self.recompute = recompute

        def kan(in_ch: int, out_ch: int, kernel_size: int = 1, **options) -> nn.Module:
            return create_kan_conv(family, spatial_dims, in_ch, out_ch, kernel_size, norm=norm,
                                   affine=affine, recompute=recompute, **options,
                                   **family_options)

        gated = 2 * channels + focal_level + 1
        if full_kan:
            self.f = kan(channels, gated, bottleneck=bottleneck, dim_reduction=dim_reduction)
            self.h = kan(channels, channels, bottleneck=bottleneck, dim_reduction=dim_reduction)
        else:
            self.f = conv_module(spatial_dims)(channels, gated, 1)
            self.h = conv_module(spatial_dims)(channels, channels, 1)
        self.proj = kan(channels, channels, bottleneck=bottleneck, dim_reduction=dim_reduction)
        self.focal_layers = nn.ModuleList(
            kan(channels, channels, k, padding=k // 2, groups=channels)
            for k in focal_kernel_sizes(focal_window, focal_level, focal_factor))
        self.norm_layer = (None if post_norm is None
                           else create_norm(post_norm, spatial_dims, channels, affine=affine))

    def modulate(self, x: Tensor) -> Tensor:
        """The layer's output (without the recompute wrapper)."""
        c, level = self.channels, self.focal_level
        q, ctx, gates = torch.split(self.f(x), (c, c, level + 1), dim=1)
        ctx_all = torch.zeros_like(q)
        for index, layer in enumerate(self.focal_layers):
            ctx = layer(ctx)
            ctx_all = ctx_all + ctx * gates[:, index:index + 1]
        spatial = tuple(range(2, x.dim()))
        ctx_all = ctx_all + ctx_all.mean(dim=spatial, keepdim=True) * gates[:, level:]
        if self.normalize_modulator:
            ctx_all = ctx_all / (level + 1)
        out = q * self.h(ctx_all)
        if self.norm_layer is not None:
            out = self.norm_layer(out)
        return self.proj(out)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(f"KANFocalModulation expected input (B, {self.channels}, "
                             f"{self.spatial_dims} spatial dims), got {tuple(x.shape)}")
        return run_recomputed(self, self.modulate, x)


__all__ = [
    "ATTENTION_NORMS", "ChannelLayerNorm", "KANFocalModulation", "KANSelfAttention",
    "ROPE_MODES", "RotaryEmbedding", "create_attention_norm", "focal_kernel_sizes",
    "rope_positions", "run_recomputed",
]
