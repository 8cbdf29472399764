"""Build the "pretrained" VGG-KAGN backbone for the kanpeft demos and benchmarks.

No ImageNet weights can be downloaded here, so the backbone is pretrained on a different task
and modality: classifying 32x32 CT patches (TotalSegmentator example CT, ../shared/data) by
the organ at their centre (background, spleen, kidney, liver, stomach, other organ). It is
saved in torch-conv-kan's checkpoint format with ``save_torch_conv_kan`` and is then loaded
by the fine-tuning tasks through ``load_torch_conv_kan``, the code path of
``brivangl/vgg_kagn11_v2`` and ``brivangl/vgg_kagn_bn11_v4``.

    .venv/bin/python pipelines/peft_pretrain.py --out runs/backbones/vgg_kagn11_ct
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kanpeft.metrics import ClassificationValidator
from kanseg.engine.config import TrainerConfig
from kanseg.engine.trainer import Trainer, seed_everything
from kanseg.models import create_model
from kanseg.models.torch_conv_kan import load_torch_conv_kan, save_torch_conv_kan

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalsegmentator"
#: class -> TotalSegmentator "total" label values (0: body tissue without organ label)
CLASSES = {"background": [0], "spleen": [1], "kidney": [2, 3], "liver": [5], "stomach": [6]}
BACKBONE = dict(in_channels=1, num_classes=len(CLASSES) + 1, family="kagn", vgg_type="VGG11",
                expected_feature_shape=(1, 1), width_scale=1, norm="batch", degree=3)


def ct_patches(size: int = 32, per_class: int = 300, seed: int = 0, val_every: int = 5,
               data_dir: Path = SHARED) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) patches centred on labelled voxels; every ``val_every``-th slice is val."""
    ct = np.asarray(nib.load(data_dir / "example_ct_sm.nii.gz").dataobj, dtype=np.float32)
    seg = np.asarray(nib.load(data_dir / "example_seg.nii.gz").dataobj)
    image = np.clip((ct + 175.0) / 425.0, 0.0, 1.0)  # CT window [-175, 250] HU -> [0, 1]
    half = size // 2
    image = np.pad(image, ((half, half), (half, half), (0, 0)))
    labelled = set(v for values in CLASSES.values() for v in values)
    masks = [(seg == 0) & (ct > -300)] + [np.isin(seg, v) for k, v in CLASSES.items()
                                          if k != "background"]
    masks.append((seg > 0) & ~np.isin(seg, list(labelled)))  # "other organ"
    rng = np.random.default_rng(seed)
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    for label, mask in enumerate(masks):
        is_val = (np.arange(mask.shape[2]) % val_every) == val_every // 2
        for name, keep in (("train", mask & ~is_val), ("val", mask & is_val)):
            coords = np.argwhere(keep)
            n = per_class if name == "train" else per_class // 4
            for x, y, z in coords[rng.choice(len(coords), size=min(n, len(coords)), replace=False)]:
                patch = image[x: x + size, y: y + size, z]
                splits[name][0].append(patch)
                splits[name][1].append(label)
    return tuple(  # type: ignore[return-value]
        TensorDataset(torch.from_numpy(np.stack(xs)).unsqueeze(1), torch.tensor(ys))
        for xs, ys in splits.values())


def pretrain(out: Path, epochs: int = 4, per_class: int = 300, seed: int = 0) -> dict[str, float]:
    """Train the backbone on CT patches and save it in torch-conv-kan's format to ``out``."""
    seed_everything(seed)
    train, val = ct_patches(per_class=per_class, seed=seed)
    model = create_model("vgg_kan", **BACKBONE)
    cfg = TrainerConfig(max_epochs=epochs, lr=2e-3, monitor="accuracy", keep_last=1, seed=seed,
                        log_every=50)
    validator = ClassificationValidator(val, 128)
    trainer = Trainer(model, nn.CrossEntropyLoss(), DataLoader(train, batch_size=64, shuffle=True),
                      cfg, out.parent / f"{out.name}-run", validate=validator)
    trainer.fit()
    trained = trainer.eval_model.eval()
    save_torch_conv_kan(trained, out)
    reloaded = load_torch_conv_kan(out)
    x = val.tensors[0][:8]
    with torch.no_grad():
        gap = (reloaded(x) - trained(x)).abs().max().item()
    if gap > 1e-5:
        raise RuntimeError(f"the saved checkpoint does not reproduce the model (max diff {gap})")
    metrics = validator(reloaded, trainer.acc)
    print(f"pretrained backbone saved to {out}: val accuracy {metrics['accuracy']:.3f}, "
          f"AUC {metrics['auc']:.3f} on {len(val)} CT patches")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/backbones/vgg_kagn11_ct"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrain(args.out, args.epochs, args.per_class, args.seed)


if __name__ == "__main__":
    main()
