"""What agreeing on a stop request costs per step, in a 2-process CPU DDP run (gloo), in the same run:

  none      no stop check at all (the baseline)
  ours      vocseg.control.StopAgreement: an asynchronous MAX all-reduce on a separate gloo group, started at
            one step and read at the next (no wait, no device sync)
  blocking  the previous way: an all-reduce of the flag and .item() every step

Each policy trains the same small DDP model on the same random batches; figures are the median of --repeats.

    python benchmarks/stop_agreement.py [--steps 60] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vocseg.control import StopAgreement  # noqa: E402

POLICIES = ("none", "ours", "blocking")


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 21, 1))


def timed_loop(model, policy: str, steps: int, size: int) -> float:
    """Seconds per step of forward + backward + SGD step + the policy's stop check."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(dist.get_rank())
    batches = [(torch.randn(4, 3, size, size, generator=generator),
                torch.randint(0, 21, (4, size, size), generator=generator)) for _ in range(4)]
    agreement = StopAgreement(dist.get_world_size()) if policy == "ours" else None
    start = None
    for step in range(steps + 5):  # 5 warm-up steps
        if step == 5:
            dist.barrier()
            start = time.perf_counter()
        images, labels = batches[step % len(batches)]
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if policy == "ours":
            agreement.poll(False)
        elif policy == "blocking":
            flag = torch.tensor([0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            bool(flag.item())
    if agreement is not None:
        agreement.close()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def worker(rank: int, world: int, init_file: str, args, results_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.nn.parallel.DistributedDataParallel(small_model())
    figures = {policy: [] for policy in POLICIES}
    for _ in range(args.repeats):
        for policy in POLICIES:  # interleaved, so drift in the machine's load hits every policy alike
            figures[policy].append(timed_loop(model, policy, args.steps, args.size))
    if rank == 0:
        Path(results_file).write_text(json.dumps(figures))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="square input size")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats, args.size = 3, 1, 16
    with tempfile.TemporaryDirectory() as folder:
        init_file, results_file = os.path.join(folder, "init"), os.path.join(folder, "results.json")
        mp.spawn(worker, args=(2, init_file, args, results_file), nprocs=2, join=True)
        figures = json.loads(Path(results_file).read_text())
    base = statistics.median(figures["none"])
    print(f"2 processes (gloo, 1 thread each), {args.steps} steps x {args.repeats} repeats, input {args.size}px")
    print(f"{'policy':<10} {'s/step (median)':>16} {'spread':>18} {'vs none':>9}")
    for policy in POLICIES:
        values = figures[policy]
        median = statistics.median(values)
        print(f"{policy:<10} {median:16.5f} {min(values):8.5f}-{max(values):.5f} {100 * (median / base - 1):+8.1f}%")


if __name__ == "__main__":
    main()
