"""Train a CIFAR baseline the benchmarks start from, through the pipeline's own baseline stage.

The accuracy benchmarks (search, latency-budget allocation) need trained baselines; this trains one on the
CIFAR-10 JPEG folder with ``pruneflow.stages.train_baseline`` (the pipeline's recipe: SGD + Nesterov, cosine,
crop + flip) and no method's training hooks, and writes ``<out>/model.pt`` (a pruneflow model file: spec,
normalisation and weights, which ``baseline.checkpoint`` and ``pruneflow prune --checkpoint`` read),
``model.onnx`` and ``metrics.json``. The files are regenerable and stay out of git (``.cache/``).

    .venv/bin/python benchmarks/train_baseline.py --model resnet20 --epochs 15   # 33 min on 2 cores: 84.08 %
    .venv/bin/python benchmarks/train_baseline.py --model resnet20 --epochs 1 --subset 512 --out .cache/smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow training on shared cores

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruneflow import stages  # noqa: E402
from pruneflow.config import PipelineConfig  # noqa: E402
from pruneflow.layout import ProjectLayout, ProjectRun  # noqa: E402
from pruneflow.versioning import DataVersion  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--data", default=".cache/cifar10-jpg/cifar10", help="image folder with train/ and test/")
    parser.add_argument("--archive", default="../shared/data/cifar10-jpg.tar.gz",
                        help="extracted into the parent of --data when --data is missing")
    parser.add_argument("--out", default=None, help="default: .cache/baselines/<model>-cifar10jpg")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--subset", type=int, default=None, help="training images used (default: all)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    if not data.is_dir():
        with tarfile.open(args.archive) as archive:
            archive.extractall(data.parent, filter="data")
    out = Path(args.out or f".cache/baselines/{args.model}-cifar10jpg")
    cfg = PipelineConfig.model_validate({
        "project": {"seed": args.seed},
        "data": {"dataset": "imagefolder", "path": str(data.resolve()), "val_fraction": args.val_fraction,
                 "subset": args.subset, "batch_size": args.batch_size, "augment": "crop_flip"},
        "model": {"name": args.model},
        "train": {"epochs": args.epochs, "lr": args.lr, "device": args.device},
        "methods": {"l1": {}},  # no training hooks: a plain baseline
    })
    metrics = stages.train_baseline(ProjectRun(ProjectLayout(out, cfg), DataVersion(data, "cifar10-jpg"), out, out))
    print(f"{out}/model.pt: test accuracy {metrics['accuracy']:.2f} %, {metrics['train_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
