"""Benchmark the training step of OUR loop (`vocseg.engine.train`) against a BARE PyTorch loop.

Both contenders train the same model (same `build_model`, same seed), on the same batches (the
DataLoader `vocseg.engine.build_train_loader` builds: same dataset view, augmentation, sampler and
collate, num_workers=0), with the same optimiser (`vocseg.optim.build_optimizer`: AdamW, four
parameter groups) and schedule, on the same number of torch threads.

  OURS: `vocseg.engine.train(TrainConfig(...))` in-process, max_train_steps = warmup + steps,
        evaluation / checkpoint only after the last step. `vocseg.engine.log_train` is wrapped to
        take a `time.perf_counter()` stamp at every step (logging_steps=1); the wrapper forwards
        to the real `log_train` only every --logging-steps steps (the demo recipe logs every 25),
        so the loop logs as often as a real run does. Timed: stamp(warmup) -> stamp(warmup+steps).
  BARE: the same model / loader / optimiser / scheduler driven by plain PyTorch:
        normalize_on_device -> model -> F.cross_entropy(ignore_index=255) (+ 0.4 x aux loss for
        DeepLab, as ours) -> backward -> AdamW step -> scheduler step -> zero_grad. No accelerate,
        no tqdm, no logging, no .item() per step. Timed over the same steps.

Per repeat, every model runs both contenders back to back, and which goes first alternates
between repeats. Other processes can only slow a run down, so the table reports the best of the
runs (as timeit does) and the overhead uses the best; median and spread ((max-min)/min) sit
beside it, and a spread above 10% is flagged. The machine may be shared: /proc/stat tells how many
cores other processes kept busy during each run; runs where they used >= --quiet-threshold cores
are marked DISTURBED and left out of the table while undisturbed runs exist (--wait-quiet waits
for a quiet CPU before each run). The per-step losses of both contenders are compared as a check
that they really compute the same thing.

Also printed per run: minor page faults per step. With glibc's default malloc a CPU training step
hands its large activation buffers back to the OS and faults them in again (10-40 thousand faults
per step here, a number that changes from run to run and moves the step time by up to ~15%);
--malloc-tuned restarts the script with glibc told to keep that memory, which removes most of that
noise. --phases splits each step into data / forward / loss / backward / optimizer / rest for
both contenders; --profile adds a cProfile of one OURS run per model.

    python benchmarks/train_step.py --models segformer-b0 deeplabv3_mobilenet_v3_large \
        --steps 30 --warmup 5 --batch-size 8 --crop-size 128 --repeats 3 [--phases] [--malloc-tuned]
    python benchmarks/train_step.py --smoke        # seconds: does it still run (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import vocseg.engine as engine  # noqa: E402
from vocseg.config import TrainConfig  # noqa: E402
from vocseg.constants import IGNORE_INDEX  # noqa: E402
from vocseg.data.dataset import load_split  # noqa: E402
from vocseg.data.synthetic import make_synthetic_tree  # noqa: E402
from vocseg.data.transforms import augments_for, normalize_on_device  # noqa: E402
from vocseg.models import build_model  # noqa: E402
from vocseg.optim import build_optimizer, build_scheduler  # noqa: E402

TARGET_OVERHEAD = 0.05
SPREAD_FLAG = 0.10
# glibc returns large freed blocks to the OS (mmap threshold, heap trimming), so every step page-faults
# its activations back in: tens of thousands of faults per step, a count that varies from run to run.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
DEFAULT_MODELS = ("segformer-b0", "deeplabv3_mobilenet_v3_large")


def make_config(args, model: str, tree: Path, cache: Path, out: Path) -> TrainConfig:
    """The demo recipe's optimisation settings, with this benchmark's model / batch / crop / steps."""
    total = args.warmup + args.steps
    return TrainConfig(
        recipe="bench", run_name=out.name, output_dir=str(out), seed=args.seed,
        data_root=str(tree), train_split="train", val_split="val", cache_dir=str(cache),
        model=model, crop_size=args.crop_size, per_device_train_batch_size=args.batch_size, num_workers=0,
        optimizer="adamw", learning_rate=0.002, weight_decay=0.01, lr_warmup_steps=min(30, total // 2), poly_power=1.0,
        max_train_steps=total, eval_steps=total, checkpointing_steps=total, logging_steps=1, tracker=args.tracker,
    )


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def seed_everything(seed: int) -> None:
    """What accelerate.utils.set_seed does on a CPU-only machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- OURS

class Phases:
    """--phases: per-step time spent in data loading (the DataLoader iterator's __next__), forward
    (SegmentationModel.forward), loss, backward (Tensor.backward) and optimizer.step (AdamW/SGD), for
    both contenders by the same class-level wrappers; "rest" = step time - their sum (accelerate's
    wrappers, tqdm, scheduler, zero_grad, the loop itself)."""

    NAMES = ("data", "forward", "loss", "backward", "optimizer")

    def __init__(self):
        self.current = dict.fromkeys(self.NAMES, 0.0)
        self.steps: dict[int, dict] = {}

    def add(self, name: str, seconds: float) -> None:
        self.current[name] += seconds

    def close(self, step: int) -> None:
        self.steps[step], self.current = self.current, dict.fromkeys(self.NAMES, 0.0)

    def reset(self) -> None:
        self.current, self.steps = dict.fromkeys(self.NAMES, 0.0), {}

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.current[name] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def install(self) -> None:
        import torch.utils.data.dataloader as dataloader_module

        import vocseg.models
        self.wrap(dataloader_module._BaseDataLoaderIter, "__next__", "data")
        self.wrap(vocseg.models.SegmentationModel, "forward", "forward")
        self.wrap(engine, "segmentation_loss", "loss")
        self.wrap(torch.Tensor, "backward", "backward")
        self.wrap(torch.optim.AdamW, "step", "optimizer")
        self.wrap(torch.optim.SGD, "step", "optimizer")

    def summary(self, stamps: dict[int, float], first: int, last: int) -> dict:
        """Mean seconds per timed step in each phase, plus 'rest' and 'step'."""
        steps = range(first + 1, last + 1)
        out = {name: statistics.fmean(self.steps[k][name] for k in steps) for name in self.NAMES}
        out["step"] = statistics.fmean(stamps[k] - stamps[k - 1] for k in steps)
        out["rest"] = out["step"] - sum(out[name] for name in self.NAMES)
        return out


PHASES: Phases | None = None  # set by --phases


def step_median(stamps: dict[int, float], args) -> float:
    """Median single-step time over the timed window: robust to another job stealing the CPU for a moment."""
    return statistics.median(stamps[k + 1] - stamps[k] for k in range(args.warmup, args.warmup + args.steps))


def run_ours(args, model_name: str, tree: Path, cache: Path, out: Path, profile: bool = False) -> dict:
    cfg = make_config(args, model_name, tree, cache, out)
    stamps: dict[int, float] = {}
    faults: dict[int, int] = {}
    losses: list[float] = []
    threads_seen: list[int] = []
    previous = {"loss": 0.0}
    original_log_train = engine.log_train
    original_threads = engine.configure_cpu_threads

    def timed_log_train(run):
        now = time.perf_counter()
        state, window = run.state, run.window
        stamps[state.step] = now
        faults[state.step] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if PHASES:
            PHASES.close(state.step)
        # window["loss"] sums the (device) losses of every micro-batch since the last real log_train call
        losses.append(float(window["loss"] - previous["loss"]))
        previous["loss"] = window["loss"]
        threads_seen.append(torch.get_num_threads())
        if state.step % args.logging_steps == 0 or state.step == cfg.max_train_steps:
            original_log_train(run)
            previous["loss"] = 0.0

    def set_threads(accelerator_cpu: bool) -> None:
        torch.set_num_threads(args.threads)  # the engine would use os.cpu_count(); --threads may differ

    reset_accelerate()
    if PHASES:
        PHASES.reset()
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    engine.log_train, engine.configure_cpu_threads = timed_log_train, set_threads
    profiler = cProfile.Profile() if profile else None
    try:
        quiet = contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext()
        with quiet:
            if profiler:
                profiler.enable()
            start = time.perf_counter()
            results = engine.train(cfg)
            total = time.perf_counter() - start
            if profiler:
                profiler.disable()
    finally:
        engine.log_train, engine.configure_cpu_threads = original_log_train, original_threads
        reset_accelerate()
    first, last = args.warmup, args.warmup + args.steps
    assert results.get("step") == last, results
    return {"s_per_step": (stamps[last] - stamps[first]) / args.steps, "step_median": step_median(stamps, args),
            "faults": (faults[last] - faults[first]) / args.steps,
            "losses": losses, "wall": total, "phases": PHASES.summary(stamps, first, last) if PHASES else None,
            "threads": sorted(set(threads_seen)), "profile": profiler, "miou": results.get("eval_mean_iou")}


# ------------------------------------------------------------------------------------------- BARE

def run_bare(args, model_name: str, tree: Path, cache: Path, out: Path) -> dict:
    cfg = make_config(args, model_name, tree, cache, out)
    if PHASES:
        PHASES.reset()
    torch.set_num_threads(args.threads)
    seed_everything(cfg.seed)  # train() seeds right before build_model too
    model = build_model(cfg)
    mean, std = model.image_mean, model.image_std
    # The engine's own data functions on a real Accelerator, not a stand-in: a stand-in rotted once already (the
    # engine started calling local_main_process_first). Nothing is prepared: the loader stays a plain DataLoader.
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    train_set, _ = engine.build_datasets(cfg, accelerator)
    train_augment, _ = augments_for(cfg, mean, std)
    loader, sampler, transform = engine.build_train_loader(cfg, accelerator, train_set, train_augment)
    reset_accelerate()
    optimizer = build_optimizer(cfg, model)
    total = cfg.max_train_steps
    scheduler = build_scheduler(cfg, optimizer, total)

    stamps, faults, losses = {}, {}, []
    step, epoch = 0, 0
    model.train()
    start = time.perf_counter()
    while step < total:
        sampler.set_position(epoch)
        transform.epoch = epoch
        for batch in loader:
            labels = batch["labels"]
            outputs = model(normalize_on_device(batch["pixel_values"], mean, std), output_size=labels.shape[-2:])
            loss_start = time.perf_counter()
            loss = F.cross_entropy(outputs["logits"], labels, ignore_index=IGNORE_INDEX)
            if "aux_logits" in outputs:
                loss = loss + cfg.aux_weight * F.cross_entropy(outputs["aux_logits"], labels,
                                                               ignore_index=IGNORE_INDEX)
            if PHASES:
                PHASES.add("loss", time.perf_counter() - loss_start)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stamps[step] = time.perf_counter()
            faults[step] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            if PHASES:
                PHASES.close(step)
            losses.append(loss.detach())
            if step >= total:
                break
        epoch += 1
    wall = time.perf_counter() - start
    first, last = args.warmup, args.warmup + args.steps
    return {"s_per_step": (stamps[last] - stamps[first]) / args.steps, "step_median": step_median(stamps, args),
            "faults": (faults[last] - faults[first]) / args.steps,
            "losses": [float(x) for x in losses], "phases": PHASES.summary(stamps, first, last) if PHASES else None,
            "wall": wall, "threads": [torch.get_num_threads()]}


# ------------------------------------------------------------------------------------------- main

def summarise(values: list[float]) -> dict:
    best = min(values)
    return {"best": best, "median": statistics.median(values), "max": max(values),
            "spread": (max(values) - best) / best}


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    return busy, own.ru_utime + own.ru_stime


def others_cores(before, after, wall: float) -> float:
    """Average cores that other processes kept busy between two cpu_seconds() samples."""
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / max(wall, 1e-9))


def wait_for_quiet(max_wait: float, threshold: float) -> float:
    """Sample 1 s at a time until other processes use < `threshold` cores (or `max_wait` runs out)."""
    waited, start = 0.0, time.perf_counter()
    while True:
        before = cpu_seconds()
        time.sleep(1.0)
        busy = others_cores(before, cpu_seconds(), 1.0)
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait:
            return busy


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_profile(profiler: cProfile.Profile, steps: int, limit: int) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats("tottime")
    stats.print_stats(limit)
    print(f"\n--- cProfile of one OURS run ({steps} steps incl. warmup, eval and checkpoint at the end), "
          f"top {limit} by own time ---")
    print(stream.getvalue())
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("cumulative")
    stats.print_stats(r"accelerate|tqdm|vocseg/engine|vocseg/log|logging/__init__", limit)
    print("--- the same, cumulative time in accelerate / tqdm / engine / logging code ---")
    print(stream.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores, "
                        "as vocseg.engine.configure_cpu_threads sets for one CPU process)")
    parser.add_argument("--logging-steps", type=int, default=25, help="OURS calls the real log_train every N "
                        "steps (demo recipe: 25); 1 logs every step")
    parser.add_argument("--tracker", default="none", help="TrainConfig.tracker for OURS (default none: the loop "
                        "itself, no experiment tracker)")
    parser.add_argument("--wait-quiet", type=float, default=60, help="before each run, wait up to this many "
                        "seconds for other processes to leave the CPU (0: do not wait)")
    parser.add_argument("--quiet-threshold", type=float, default=0.2, help="'quiet' = other processes use fewer "
                        "cores than this")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num-train", type=int, default=64)
    parser.add_argument("--phases", action="store_true", help="time data / forward / loss / backward / optimizer "
                        "per step in both contenders and print where ours spends its extra time")
    parser.add_argument("--malloc-tuned", action="store_true", help="re-run this script with glibc malloc "
                        f"told to keep freed memory ({' '.join(f'{k}={v}' for k, v in MALLOC_TUNING.items())}): "
                        "far fewer page faults per step, and much less run-to-run noise")
    parser.add_argument("--profile", action="store_true", help="after the timings, cProfile one OURS run per model")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--verbose", dest="quiet", action="store_false", help="show OURS's log lines")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: CI runs it to catch a crash; "
                        "its figures mean nothing and never fail it")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.crop_size, args.repeats = 2, 1, 2, 32, 1
        args.num_train, args.wait_quiet, args.logging_steps, args.threads = 8, 0, 1, 1
    if args.malloc_tuned and any(os.environ.get(k) != v for k, v in MALLOC_TUNING.items()):
        # glibc reads these at start-up only: start again with them set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNING})
    global PHASES
    if args.phases:
        PHASES = Phases()
        PHASES.install()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, torch threads {args.threads}; "
          f"batch {args.batch_size}, crop {args.crop_size}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"{args.repeats} repeats; load average at start: {loadavg()}; glibc malloc: "
          + (" ".join(f"{k}={os.environ[k]}" for k in MALLOC_TUNING if k in os.environ) or "default"))
    runs = {m: {"ours": [], "bare": []} for m in args.models}  # per run: s/step, median step, others' cores
    last_losses, busy_runs = {}, []
    with tempfile.TemporaryDirectory(prefix="vocseg-bench-") as tmp:
        tmp = Path(tmp)
        tree, cache = tmp / "tree", tmp / "cache"
        make_synthetic_tree(tree, num_train=args.num_train, num_val=2 if args.smoke else 4,
                            scale=0.15 if args.smoke else 0.5)
        for split in ("train", "val"):  # build the Arrow caches once, outside every run
            load_split(split, tree, None, cache)
        run_id = 0
        for repeat in range(args.repeats):
            for i, model in enumerate(args.models):
                order = ("ours", "bare") if (repeat + i) % 2 == 0 else ("bare", "ours")
                for contender in order:
                    run_id += 1
                    out = tmp / f"run{run_id:03d}-{contender}"
                    if args.wait_quiet > 0:
                        wait_for_quiet(args.wait_quiet, args.quiet_threshold)
                    before, start = cpu_seconds(), time.perf_counter()
                    result = (run_ours if contender == "ours" else run_bare)(args, model, tree, cache, out)
                    others = others_cores(before, cpu_seconds(), time.perf_counter() - start)
                    busy_runs.append(others)
                    runs[model][contender].append({"s": result["s_per_step"], "med": result["step_median"],
                                                   "others": others, "phases": result["phases"],
                                                   "faults": result["faults"]})
                    last_losses[(model, contender)] = result["losses"]
                    print(f"  repeat {repeat + 1} {model:30s} {contender}: {result['s_per_step']:.4f} s/step, "
                          f"median step {result['step_median']:.4f} s, {result['faults']:.0f} page faults/step "
                          f"(threads {result['threads']}, "
                          f"other processes {others:.2f} cores{'' if others < args.quiet_threshold else ' DISTURBED'}"
                          f", load {loadavg()})", flush=True)

        print(f"\nload average at end: {loadavg()}; other processes used {min(busy_runs):.2f}-{max(busy_runs):.2f} "
              f"cores during the runs (median {statistics.median(busy_runs):.2f})\n")
        header = (f"{'model':30s} {'ours s/step':>12s} {'bare s/step':>12s} {'overhead':>9s}   "
                  f"{'ours median / spread':>21s} {'bare median / spread':>21s} {'runs used':>10s}   target")
        print(header)
        print("-" * len(header))
        failed, robust = False, []
        for model in args.models:
            chosen = {}
            for contender in ("ours", "bare"):
                clean = [r for r in runs[model][contender] if r["others"] < args.quiet_threshold]
                chosen[contender] = clean or runs[model][contender]
            all_clean = all(len(chosen[c]) == len([r for r in chosen[c] if r["others"] < args.quiet_threshold])
                            for c in chosen)
            ours, bare = summarise([r["s"] for r in chosen["ours"]]), summarise([r["s"] for r in chosen["bare"]])
            overhead = ours["best"] / bare["best"] - 1
            ok = overhead <= TARGET_OVERHEAD
            failed |= not ok
            flag = (" (noisy)" if max(ours["spread"], bare["spread"]) > SPREAD_FLAG else "") + \
                ("" if all_clean else " (no undisturbed run: all runs used)")
            used = f"{len(chosen['ours'])}+{len(chosen['bare'])}/{2 * args.repeats}"
            print(f"{model:30s} {ours['best']:12.4f} {bare['best']:12.4f} {overhead:+8.1%}   "
                  f"{ours['median']:9.4f} / {ours['spread']:6.1%}    {bare['median']:9.4f} / {bare['spread']:6.1%} "
                  f"{used:>10s}   {'OK' if ok else 'OVER'} (<= {TARGET_OVERHEAD:.0%}){flag}")
            robust.append((model, min(r["med"] for r in chosen["ours"]), min(r["med"] for r in chosen["bare"])))
        print("s/step = (stamp[warmup+steps] - stamp[warmup]) / steps; best of the runs used; "
              "overhead = ours/bare - 1 "
              f"on the best;\nmedian and spread = (max - min) / min over the runs used; runs used = the runs during "
              f"which other processes\nkept < {args.quiet_threshold} cores busy (all runs if a contender has none)")
        print("\nrobust view (median single-step time of each run, best of the runs used):")
        for model, ours, bare in robust:
            print(f"{model:30s} ours {ours:.4f}  bare {bare:.4f}  overhead {ours / bare - 1:+.1%}")
        if args.phases:
            names = (*Phases.NAMES, "rest", "step")
            print("\nwhere the time goes (ms per timed step, the best run of each contender among the runs used):")
            print(f"{'model':30s} {'':5s} " + " ".join(f"{n:>9s}" for n in names))
            for model in args.models:
                best = {}
                for contender in ("ours", "bare"):
                    pool = [r for r in runs[model][contender] if r["others"] < args.quiet_threshold] or \
                        runs[model][contender]
                    best[contender] = min(pool, key=lambda r: r["s"])["phases"]
                    print(f"{model:30s} {contender:5s} " + " ".join(f"{1e3 * best[contender][n]:9.2f}" for n in names))
                print(f"{'':30s} {'diff':5s} " + " ".join(f"{1e3 * (best['ours'][n] - best['bare'][n]):+9.2f}"
                                                          for n in names))
            print("data = DataLoader __next__ (ours: accelerate prefetches one batch ahead, so it is the next "
                  "step's batch); rest = step - the others")
        print("\nall runs, s/step (others' cores): " + "; ".join(
            f"{m} " + " ".join(f"{c} [" + ", ".join(f"{r['s']:.4f} ({r['others']:.2f})" for r in runs[m][c]) + "]"
                               for c in ("ours", "bare")) for m in args.models))
        for model in args.models:
            ours_l, bare_l = np.array(last_losses[(model, "ours")]), np.array(last_losses[(model, "bare")])
            diff = np.abs(ours_l - bare_l).max() / max(np.abs(bare_l).max(), 1e-12)
            print(f"same computation check, {model}: max relative loss difference over {len(bare_l)} steps "
                  f"{diff:.1e} (first {bare_l[0]:.4f}, last ours {ours_l[-1]:.4f} / bare {bare_l[-1]:.4f})")

        if args.profile:
            for model in args.models:
                run_id += 1
                result = run_ours(args, model, tree, cache, tmp / f"run{run_id:03d}-profile", profile=True)
                print(f"\n=== {model} ===")
                print_profile(result["profile"], args.warmup + args.steps, args.profile_lines)
    return 1 if failed and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
