"""What ClearML tracking (offline mode, no server) costs a training run, against the same run with no tracker.

Each run is a fresh process (`python benchmarks/tracker_cost.py --child ...`) that calls
`vocseg.engine.train` on the same tiny synthetic split: SegFormer-B0, crop 64, batch 4, --steps steps,
logging every step, two evaluations with debug samples. The parent measures the process's wall time and
samples the memory of the whole process tree (the run and every process it starts) every 50 ms:
RSS summed over the processes (what `top` shows; pages shared by a fork count twice) and PSS (shared
pages split between their sharers: what the processes really add), and its CPU time (less sensitive than the
wall time to other jobs on a shared machine). Variants:

  none              tracker none: the baseline
  clearml           tracker clearml, offline, as vocseg runs it (ClearML reports from a thread)
  clearml-default   the same with ClearML's own default on Linux: reporting from a forked subprocess
                    (sdk.development.report_use_subprocess), i.e. vocseg before it turned that off offline

Variants take turns within each repeat; the table shows the best wall time and the lowest peak of the
repeats (other processes only ever add to both).

    python benchmarks/tracker_cost.py --steps 16 --repeats 3
    python benchmarks/tracker_cost.py --smoke      # seconds: does it still run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("none", "clearml", "clearml-default")


def tree_memory(root: psutil.Process) -> tuple[int, int, int]:
    """(RSS sum, PSS sum, process count) of `root` and all its descendants; vanished processes count 0."""
    rss = pss = count = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    for process in processes:
        try:
            info = process.memory_full_info()
            rss, pss, count = rss + info.rss, pss + getattr(info, "pss", info.rss), count + 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss, count


def measure(variant: str, args, workdir: Path) -> dict:
    out = workdir / f"run-{variant}-{time.monotonic_ns()}"
    env = {**os.environ, "CLEARML_CACHE_DIR": str(workdir / "clearml"), "CLEARML_CONFIG_FILE": str(workdir / "none"),
           "PYTHONPATH": str(REPO)}
    for name in ("CLEARML_API_HOST", "CLEARML_OFFLINE_MODE", "CLEARML_TASK_ID"):
        env.pop(name, None)
    command = [sys.executable, __file__, "--child", variant, "--tree", str(workdir / "tree"), "--out", str(out),
               "--steps", str(args.steps), "--crop-size", str(args.crop_size)]
    log = open(f"{out}.log", "w")  # a file, not a pipe: an unread pipe would block the run once full
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = most_processes = 0
    while True:
        # wait4, not poll: its rusage is the run's CPU time, with the processes it started and reaped
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        rss, pss, count = tree_memory(root)
        peak_rss, peak_pss, most_processes = max(peak_rss, rss), max(peak_pss, pss), max(most_processes, count)
        time.sleep(0.05)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if child.returncode != 0:
        raise SystemExit(f"{variant} run failed (exit {child.returncode}): {' '.join(command)}\n"
                         f"{Path(f'{out}.log').read_text()[-3000:]}")
    report = json.loads(Path(f"{out}.json").read_text())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": peak_rss, "pss": peak_pss,
            "processes": most_processes, **report}


def child_main(args) -> None:
    """One training run in this process; writes OUT.json: seconds in train(), in Task.init and in the tracker's
    close (timed around the SDK call and vocseg's Reporter.close)."""
    import contextlib
    import io

    from clearml import Task

    import vocseg.engine as engine
    from vocseg.config import TrainConfig
    from vocseg.tracking import Reporter

    seconds = {"init_s": 0.0, "close_s": 0.0}

    def timed(function, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                seconds[key] += time.perf_counter() - start
        return wrapper

    real_init = Task.__dict__["init"].__func__

    def init(cls, *a, **k):
        if args.child == "clearml-default":  # undo vocseg's offline setting: ClearML's Linux default
            Task._report_subprocess_enabled = True
        return real_init(cls, *a, **k)

    Task.init = classmethod(timed(init, "init_s"))
    Reporter.close = timed(Reporter.close, "close_s")
    cfg = TrainConfig(recipe="tracker-cost", run_name=Path(args.out).name, output_dir=args.out, seed=0,
                      data_root=args.tree, train_split="train", val_split="val",
                      cache_dir=str(Path(args.tree) / "cache"),
                      model="segformer-b0", crop_size=args.crop_size, per_device_train_batch_size=4, num_workers=0,
                      optimizer="adamw", learning_rate=1e-3, max_train_steps=args.steps,
                      eval_steps=max(1, args.steps // 2), checkpointing_steps=args.steps, logging_steps=1,
                      num_debug_samples=2, tracker="none" if args.child == "none" else "clearml")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        engine.train(cfg)
    Path(f"{args.out}.json").write_text(json.dumps({"train_s": time.perf_counter() - start, **seconds}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: CI runs it to catch a crash; "
                        "its figures mean nothing and never fail it")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    if args.smoke:
        args.steps, args.crop_size, args.repeats, args.variants = 2, 32, 1, ["clearml"]  # the tracked path

    sys.path.insert(0, str(REPO))
    from vocseg.data.synthetic import make_synthetic_tree

    runs = {variant: [] for variant in args.variants}
    with tempfile.TemporaryDirectory(prefix="vocseg-tracker-cost-") as tmp:
        workdir = Path(tmp)
        make_synthetic_tree(workdir / "tree", num_train=32, num_val=4, scale=0.3, seed=0)
        if not args.smoke:
            measure("none", args, workdir)  # untimed: builds the Arrow caches and warms the file cache
        print(f"{args.steps} steps of segformer-b0, crop {args.crop_size}, batch 4, {args.repeats} repeat(s); "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
        for repeat in range(args.repeats):
            order = args.variants if repeat % 2 == 0 else args.variants[::-1]
            for variant in order:
                result = measure(variant, args, workdir)
                runs[variant].append(result)
                print(f"  [{repeat + 1}] {variant:16s} wall {result['wall']:6.1f} s, CPU {result['cpu']:6.1f} s "
                      f"(train() {result['train_s']:5.1f} s, Task.init {result['init_s']:4.1f} s, "
                      f"tracker close {result['close_s']:4.1f} s), peak RSS {result['rss'] / 2**30:5.2f} GiB, "
                      f"PSS {result['pss'] / 2**30:5.2f} GiB, {result['processes']} process(es)", flush=True)

    keys = ("wall", "cpu", "train_s", "init_s", "close_s", "rss", "pss")
    best = {v: {key: min(r[key] for r in rs) for key in keys} | {"processes": max(r["processes"] for r in rs)}
            for v, rs in runs.items()}
    base = best.get("none")
    header = ("tracker", "wall s", "vs none", "CPU s", "vs none", "Task.init s", "tracker close s",
              "peak tree RSS GiB", "vs none", "peak tree PSS GiB", "vs none", "processes")
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for variant, b in best.items():
        def delta(key, scale=1.0, unit="", b=b, variant=variant):
            return f"{(b[key] - base[key]) / scale:+.2f}{unit}" if base and variant != "none" else "-"
        print(f"| {variant} | {b['wall']:.1f} | {delta('wall', unit=' s')} | {b['cpu']:.1f} | "
              f"{delta('cpu', unit=' s')} | {b['init_s']:.1f} | {b['close_s']:.1f} | "
              f"{b['rss'] / 2**30:.2f} | {delta('rss', 2**30)} | {b['pss'] / 2**30:.2f} | {delta('pss', 2**30)} | "
              f"{b['processes']} |")
    print(f"best wall time, CPU time (user + system of the run and the processes it reaped) and lowest peaks of "
          f"{args.repeats} repeat(s); load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
