"""Stopping a run cleanly: signals, agreement between processes, and divergence detection.

None of this syncs the host with the GPU on a normal step:
- a stop request (SIGTERM / SIGINT) is agreed between ranks with an asynchronous all-reduce on a CPU (gloo)
  group, started at one step and read at the next, so every rank stops at the same step, one step after the
  signal, without waiting for the device;
- non-finite losses / gradient norms are counted on the device and read only where the loop syncs anyway
  (logging steps, before an evaluation or a checkpoint).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger("vocseg")


class StopRequest:
    """The first SIGTERM / SIGINT asks the loop to checkpoint and leave; a second SIGINT aborts at once."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no signal handling
                pass
        die_with_launcher()

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: leave now
        if not self.requested:
            self.requested, self.signal_name = True, signal.Signals(signum).name
            if int(os.environ.get("RANK", "0")) == 0:
                # os.write, not logging: a signal handler must not take the logging lock the loop may hold.
                os.write(2, f"\n{self.signal_name} received: saving a checkpoint at the next step, then exiting "
                            "(Ctrl-C again to abort without saving)\n".encode())

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def die_with_launcher() -> None:
    """Under `accelerate launch` (one process), SIGTERM kills the launcher but is not passed on to the training
    process; ask the kernel to send it SIGTERM when its parent dies, so a preempted run still checkpoints."""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ or not os.path.exists("/proc/self"):
        return  # not started by accelerate launch (which sets it for every process), or not Linux
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class StopAgreement:
    """All ranks agree to stop at the same step: asynchronous MAX all-reduce of the local flag on a gloo group.

    `poll` starts this step's reduce and returns the previous step's result, so the collective's latency is
    hidden and nothing waits for the GPU. Every rank must call `poll` exactly once per step, then `close`.
    """

    def __init__(self, num_processes: int):
        self.group = dist.new_group(backend="gloo") if num_processes > 1 and dist.is_initialized() else None
        self._pending = None

    def poll(self, local_request: bool) -> bool:
        if self.group is None:
            return local_request
        agreed = self._collect()
        flag = torch.tensor([int(local_request)], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def now(self, local_request: bool) -> bool:
        """A blocking agreement (after an evaluation, where ranks may have stopped at different batches)."""
        if self.group is None:
            return local_request
        pending = self._collect()
        flag = torch.tensor([int(local_request)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return pending or bool(flag.item())

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        work.wait()
        self._pending = None
        return bool(flag.item())  # a CPU tensor: no device sync

    def close(self) -> None:
        self._collect()


class NonFiniteMonitor:
    """Counts optimiser steps whose loss or gradient norm was not finite, on the device (no per-step sync)."""

    def __init__(self, device):
        self.bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device))
        self.bad_steps += bad.to(torch.int64)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def read(self, accelerator) -> tuple[int, int]:
        """(bad steps, first bad step) over all ranks; a host sync, so call it only where the loop syncs anyway."""
        counts = accelerator.reduce(self.bad_steps.clone(), "sum") if accelerator.num_processes > 1 else self.bad_steps
        first = self.first_bad_step
        if accelerator.num_processes > 1:
            first = accelerator.gather(first.reshape(1))
            first = first[first >= 0].min() if bool((first >= 0).any()) else torch.tensor(-1)
        return int(counts), int(first)
