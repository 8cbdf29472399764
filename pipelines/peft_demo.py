"""kanpeft end to end in a few minutes on 2 CPUs: pretrained backbone (built if missing) ->
``kanpeft methods`` -> ``kanpeft finetune`` (adapter scales, 1 epoch, PneumoniaMNIST) ->
``kanpeft merge`` -> check that the merged torch-conv-kan checkpoint scores the same.

    .venv/bin/python pipelines/peft_demo.py [--method lora] [--epochs 1]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from kanpeft.cli import main as kanpeft_main
from kanpeft.config import load_config
from kanpeft.data import classification_split
from kanpeft.metrics import classification_metrics
from kanseg.models.torch_conv_kan import load_torch_conv_kan

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="scales", choices=["basis", "scales", "lora"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--backbone", type=Path, default=ROOT / "runs/backbones/vgg_kagn11_ct")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/peft_demo")
    args = parser.parse_args()
    if not (args.backbone / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "pipelines/peft_pretrain.py"),
                        "--out", str(args.backbone)], check=True)
    kanpeft_main(["methods", "--backbone", str(args.backbone)])
    config = ROOT / "configs/peft_pneumonia.yaml"
    overrides = [f"backbone={args.backbone}", f"peft.method={args.method}",
                 f"trainer.max_epochs={args.epochs}"]
    kanpeft_main(["finetune", "--config", str(config), "--output", str(args.out),
                  *[a for o in overrides for a in ("--set", o)]])
    kanpeft_main(["merge", "--adapter", str(args.out / "adapter"), "--output",
                  str(args.out / "merged")])
    cfg = load_config(config, overrides)
    test = DataLoader(classification_split(cfg.classification, "test"), batch_size=128)
    merged = load_torch_conv_kan(args.out / "merged")
    metrics = classification_metrics(merged, test, torch.device("cpu"))
    print(f"merged checkpoint {args.out / 'merged'}: test accuracy {metrics['accuracy']:.4f}, "
          f"AUC {metrics['auc']:.4f}")


if __name__ == "__main__":
    main()
