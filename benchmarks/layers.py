"""Benchmark the KAN convolution core: forward + backward time, saved-for-backward bytes and
no-grad (inference) forward time.

For every family, 2D and 3D, groups 1 and 4, each layer is timed against baselines measured in
the same run, round-robin so that load from other processes hits all of them alike:

* ``plain``: ConvNd + InstanceNorm + SiLU with the same channels;
* ``floor``: one ConvNd over ``in * n_expanded`` channels (``in * (degree + 2)`` for KAGN) on a
  precomputed input that requires grad: the arithmetic floor of a fused KAN layer. With groups,
  each round takes the faster of the grouped convolution and its dense equivalent (what the
  layers' ``conv_strategy`` may run instead: oneDNN's grouped 3D backward is slow on CPU);
* ``tck``: torch-conv-kan's KAGNConv2DLayer / KAGNConv3DLayer (KAGN rows only), imported at run
  time from the reference checkout ``../shared/reference/torch-conv-kan`` next to this repository
  (``--tck``); the column is skipped when it is absent.

KAGN also runs with ``compile_expansion=True`` (the expansion and its backward as
inductor-compiled kernels; the first calls compile, outside the timing; ``--compile-expansion``
names the families that do, KAGN by default) and with ``recompute=False``; ``--compile`` adds
every KAN layer under ``torch.compile`` as a whole.

Like the command-line programs, the benchmark keeps freed memory in the process
(:mod:`kanseg.allocator`; ``KANSEG_ALLOCATOR=system`` keeps glibc's defaults). Floors count
every expanded channel (``in * (degree + 2)``); the layers leave the constant ``P_0`` out of
their convolution, so they can run under their floor.

Run ``python benchmarks/layers.py --help``.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from kanseg.allocator import keep_freed_memory
from kanseg.layers import BASIS_REGISTRY, KANConv, create_kan_conv

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TCK = REPO.parent / "shared" / "reference" / "torch-conv-kan"
CASES = {2: dict(batch=8, channels=32, size=64), 3: dict(batch=2, channels=16, size=32)}
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def load_torch_conv_kan(source: Path | None):
    """Import torch-conv-kan's ``kagn_conv`` from a checkout or git dir, exported to a temp dir."""
    if source is None or not source.exists():
        return None
    if (source / "kan_convs" / "kagn_conv.py").exists():
        folder = source / "kan_convs"
    else:
        folder = Path(tempfile.mkdtemp(prefix="tck-")) / "kan_convs"
        archive = subprocess.run(["git", "-C", str(source), "archive", "HEAD", "kan_convs"],
                                 capture_output=True, check=False)
        if archive.returncode:
            return None
        subprocess.run(["tar", "-x", "-C", str(folder.parent)], input=archive.stdout, check=True)
    sys.path.insert(0, str(folder))
    import kagn_conv  # noqa: PLC0415 - imported from the exported copy at run time

    return kagn_conv


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while running ``fn``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def forget_memoized(module: nn.Module) -> None:
    """Empty the ``functools.lru_cache`` of every method of ``module`` and its submodules.

    torch-conv-kan's KAGN layers memoize their Gram polynomials on the input tensor, a new
    tensor at every call: the cache never hits, and keeps up to 128 basis tensors (with their
    autograd graphs) alive. In a round-robin benchmark that grows the heap by ~60 MB per round,
    and the candidates timed next fault in fresh pages (eager KAGN timed 2x slower than alone).
    Emptying it after each call only drops what would never be read again.
    """
    for sub in module.modules():
        for cls in type(sub).__mro__:
            for attribute in vars(cls).values():
                if hasattr(attribute, "cache_clear"):
                    attribute.cache_clear()


def step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` on ``x``."""

    def run() -> None:
        module(x).sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None
        forget_memoized(module)

    return run


def inference(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward of ``module`` on ``x`` under ``torch.no_grad()``."""

    def run() -> None:
        with torch.no_grad():
            module(x)
        forget_memoized(module)

    return run


MODES = {"train": step, "no_grad": inference}


def floors(width: int, groups: int) -> dict[str, int]:
    """Names of the floor convolutions over ``width`` channels and their groups: the grouped
    one, and with groups also the dense one."""
    return {f"floor{width}": groups, **({f"floor{width} dense": 1} if groups > 1 else {})}


def candidates(dims: int, groups: int, families: list[str], tck, batch_scale: int = 1,
               dtype: torch.dtype = torch.float32, compile_layers: bool = False,
               compile_expansion: tuple[str, ...] = ("kagn",)
               ) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Modules to time and the input each runs on (on the default device, in ``dtype``);
    with ``compile_layers``, each KAN layer also runs under ``torch.compile``; the families
    in ``compile_expansion`` (of those timed) also run with ``compile_expansion=True``."""
    case = CASES[dims]
    channels = case["channels"]
    shape = (case["batch"] * batch_scale, channels) + (case["size"],) * dims
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    runs: dict[str, tuple[nn.Module, torch.Tensor]] = {}
    runs["plain"] = (nn.Sequential(CONV[dims](channels, channels, 3, padding=1, groups=groups, bias=False),
                                   NORM[dims](channels, affine=True), nn.SiLU()), x)
    for family in families:
        layer = create_kan_conv(family, dims, channels, channels, 3, padding=1, groups=groups)
        runs[family] = (layer, x)
        if compile_layers:
            runs[f"{family} compiled"] = (torch.compile(layer), x)
        width = channels * layer.n_expanded
        if f"floor{width}" not in runs:
            floor_x = torch.randn((shape[0], width) + shape[2:], dtype=dtype, requires_grad=True)
            for name, conv_groups in floors(width, groups).items():
                runs[name] = (CONV[dims](width, channels, 3, padding=1, groups=conv_groups,
                                         bias=False), floor_x)
    for family in families:
        if family in compile_expansion:
            runs[f"{family} compile_expansion"] = (create_kan_conv(
                family, dims, channels, channels, 3, padding=1, groups=groups,
                compile_expansion=True), x)
    if "kagn" in families:
        saving = create_kan_conv("kagn", dims, channels, channels, 3, padding=1, groups=groups,
                                 recompute=False)
        runs["kagn recompute=False"] = (saving, x)
        if compile_layers:
            runs["kagn recompute=False compiled"] = (torch.compile(saving), x)
    if tck is not None and "kagn" in families:
        cls = tck.KAGNConv2DLayer if dims == 2 else tck.KAGNConv3DLayer
        runs["tck"] = (cls(channels, channels, 3, degree=3, padding=1, groups=groups), x)
    return {name: (module.to(dtype), x) for name, (module, x) in runs.items()}


def synchronize() -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(runs: dict[str, tuple[nn.Module, torch.Tensor]], repeats: int,
            label: str) -> dict[str, dict[str, list[float]]]:
    """Seconds per mode (forward + backward, no-grad forward), candidate and round, timed
    round-robin."""
    times = {mode: {name: [] for name in runs} for mode in MODES}
    for module, x in runs.values():
        for make_run in MODES.values():
            make_run(module, x)()  # warm-up: oneDNN / cuDNN primitives, conv strategy choice
    for _ in tqdm(range(repeats), desc=label, leave=False):
        for name, (module, x) in runs.items():
            for mode, make_run in MODES.items():
                run = make_run(module, x)
                synchronize()
                start = time.perf_counter()
                run()
                synchronize()
                times[mode][name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], name: str, baselines: list[str]) -> str:
    """Median over rounds of ``name``'s time over the fastest of ``baselines`` in the same round
    (robust to load that changes between rounds), or ``-`` if none was timed."""
    timed = [times[b] for b in baselines if b in times]
    if not timed:
        return "-"
    per_round = (a / min(b) for a, *b in zip(times[name], *timed))
    return f"{statistics.median(per_round):.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="KAGN only, 3 repeats (the targets)")
    parser.add_argument("--families", nargs="+", choices=sorted(BASIS_REGISTRY), help="families to time")
    parser.add_argument("--dims", nargs="+", type=int, choices=(2, 3), default=[2, 3])
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, help="timed runs per candidate (median); default 5, 3 with --quick")
    parser.add_argument("--tck", type=Path, default=DEFAULT_TCK,
                        help="torch-conv-kan checkout or git dir (column skipped if absent)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of every module and input (bf16: the whole layer in bf16)")
    parser.add_argument("--batch-scale", type=int, default=1,
                        help="multiply the batch of each case (larger work per call on a GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every KAN layer under torch.compile (inductor; the "
                             "first calls compile, outside the timing)")
    parser.add_argument("--compile-expansion", nargs="*", choices=sorted(BASIS_REGISTRY),
                        default=["kagn"], metavar="FAMILY",
                        help="families (of those timed) also timed with compile_expansion=True "
                             "(default: kagn; none without names)")
    args = parser.parse_args(argv)
    allocator = "keeps freed memory" if keep_freed_memory() else "system default"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    torch.set_default_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    families = args.families or (["kagn"] if args.quick else list(BASIS_REGISTRY))
    repeats = args.repeats or (3 if args.quick else 5)
    tck = load_torch_conv_kan(args.tck)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {device}, {args.dtype}, repeats={repeats}, "
          f"batch x{args.batch_scale}, torch-conv-kan: {'yes' if tck else 'absent'}, "
          f"allocator: {allocator}")
    header = ("| family | dims | groups | fwd+bwd ms | x plain | x floor | x tck | saved / input "
              "| no-grad fwd ms | no-grad x floor |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for dims in args.dims:
        for groups in args.groups:
            runs = candidates(dims, groups, families, tck, args.batch_scale, dtype, args.compile,
                              tuple(args.compile_expansion))
            times = measure(runs, repeats, f"{dims}D groups={groups}")
            train, no_grad = times["train"], times["no_grad"]
            input_bytes = runs["plain"][1].numel() * runs["plain"][1].element_size()
            variants = [f"{family} {variant}" for variant in ("compiled", "compile_expansion")
                        for family in families]
            for name in [*families, *variants, "kagn recompute=False",
                         "kagn recompute=False compiled", "tck", "plain"]:
                if name not in runs:
                    continue
                module, x = runs[name]
                layer = getattr(module, "_orig_mod", module)  # the layer inside torch.compile
                floor = (list(floors(x.shape[1] * layer.n_expanded, groups))
                         if isinstance(layer, KANConv) else [])
                saved = saved_bytes(lambda: module(x)) / input_bytes
                forget_memoized(module)
                rows.append(
                    f"| {name} | {dims} | {groups} | {1e3 * statistics.median(train[name]):.0f} | "
                    f"{ratio(train, name, ['plain'])} | {ratio(train, name, floor)} | "
                    f"{ratio(train, name, ['tck'] if name.startswith('kagn') else [])} | {saved:.1f} | "
                    f"{1e3 * statistics.median(no_grad[name]):.1f} | {ratio(no_grad, name, floor)} |"
                )
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
