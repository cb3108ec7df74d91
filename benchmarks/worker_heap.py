"""Why chains on worker processes train slower than in the pipeline's process, and what ``TrainingHeap`` wins back.

Two interleaved comparisons of one epoch of the pipeline's training loop (``pruneflow.training.train``: ``small_cnn``,
``--steps`` batches of 64 8×8 inputs):

- in this process, torch with 2 threads against 1: how much of the machine one chain already uses;
- in one worker of the pipeline's local cluster (a Dask nanny's process, 1 torch thread), glibc's heap thresholds
  as the nanny leaves them (``MALLOC_TRIM_THRESHOLD_=65536`` freezes the mmap threshold at 128 KiB) against
  ``TrainingHeap``'s.

Each arm runs ``--rounds`` times, the order alternating; wall and CPU time (user + system, of the process) per
arm, and their ratio round by round. Results: docs/benchmarks/scaling.md.

    flock /work/notes/timing.lock .venv/bin/python benchmarks/worker_heap.py
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable

import dask
import distributed
import torch
from tabulate import tabulate

from pruneflow import training
from pruneflow.config import TrainConfig
from pruneflow.flows.cluster import TorchThreads, TrainingHeap, local_cluster
from pruneflow.models import build_model

# glibc's thresholds in a nanny's worker: mmap frozen at glibc's default, trim as Dask's config sets it
NANNY = (128 << 10, int(dask.config.get("distributed.nanny.pre-spawn-environ")["MALLOC_TRIM_THRESHOLD_"]))


def train(steps: int, threads: int, heap: str = "as is") -> tuple[float, float, float]:
    """Wall, CPU and kernel CPU seconds of ``steps`` training steps on ``threads`` torch threads, the process's heap
    thresholds left ``as is``, set as a ``nanny`` leaves them or by ``TrainingHeap`` first."""
    torch.set_num_threads(threads)
    if heap == "nanny":
        TrainingHeap.set_thresholds(*NANNY)
    elif heap == "TrainingHeap":
        TrainingHeap().setup(None)
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10)
    batch = (torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    start, times = time.perf_counter(), os.times()
    training.train(model, [batch] * steps, TrainConfig(epochs=1, device="cpu"))
    end = os.times()
    return time.perf_counter() - start, end.user - times.user + end.system - times.system, end.system - times.system


def interleave(arms: dict[str, Callable[[], tuple[float, float, float]]], rounds: int) -> list[list[str]]:
    """Rows (arm, wall, CPU, kernel CPU, wall and CPU ratio to the last arm) over alternating rounds."""
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in arms}
    for round_ in range(rounds):
        for name, arm in (arms.items() if round_ % 2 == 0 else reversed(arms.items())):
            results[name].append(arm())
    last = results[list(arms)[-1]]

    def mean_std(values: list[float]) -> str:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"

    return [[name, mean_std([r[0] for r in runs]), mean_std([r[1] for r in runs]),
             f"{statistics.mean(r[2] for r in runs):.2f}",
             mean_std([r[0] / base[0] for r, base in zip(runs, last, strict=True)]),
             mean_std([r[1] / base[1] for r, base in zip(runs, last, strict=True)])] for name, runs in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    rows = interleave({"in process, 1 thread": lambda: train(args.steps, 1),
                       "in process, 2 threads": lambda: train(args.steps, 2)}, args.rounds)
    with local_cluster(workers=1, gpus=0) as cluster, distributed.Client(cluster) as client:
        client.register_plugin(TorchThreads({socket.gethostname(): 1}))
        [worker] = client.scheduler_info()["workers"]

        def in_worker(heap: str) -> Callable[[], tuple[float, float, float]]:
            return lambda: client.submit(train, args.steps, 1, heap, workers=[worker], pure=False).result()

        rows += interleave({"worker, the nanny's heap": in_worker("nanny"),
                            "worker, TrainingHeap": in_worker("TrainingHeap")}, args.rounds)
    print(f"{args.steps} steps, {args.rounds} rounds, {os.cpu_count()} cores; ratios to the row below each pair")
    print(tabulate(rows, ["arm", "wall (s)", "CPU (s)", "kernel CPU (s)", "wall ratio", "CPU ratio"],
                   tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
