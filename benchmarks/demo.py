"""Run the quick start exactly as a user would and time it: `accelerate launch --cpu train.py`, no other arguments.

The command runs as a subprocess in an empty temporary working directory (so `outputs/` lands
there), with VOCSEG_CACHE pointed at a temporary folder (or --cache-dir, to reuse one) and
DATASET_PATH / SBD_DATASET_PATH removed from the environment, so train.py picks configs/demo.yaml.
The wall time covers everything after install: synthetic data generation, Arrow cache building,
model building, training, evaluations, checkpoints and the export. The final val mIoU is read
from `outputs/*/all_results.json`. Both are printed beside the README's promise: val mIoU >= 0.7
within 5 minutes of wall time.

Phases are timed from the outside: the synthetic tree is done when its manifest appears in the
cache, setup ends at the engine's "training ..." log line, and every "step N" / "eval step N"
line is stamped as it arrives.

    python benchmarks/demo.py                      # fresh cache: the first-run experience
    python benchmarks/demo.py --cache-dir DIR      # reuse (or fill) a VOCSEG_CACHE
    python benchmarks/demo.py --smoke              # 2 steps: does the quick start still run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_MIOU = 0.7
TARGET_WALL_S = 300.0
DEMO_DATA = "synthetic-demo-v1-seed0"
SMOKE_ARGS = ["--max_train_steps", "2", "--lr_warmup_steps", "1", "--eval_steps", "2", "--checkpointing_steps", "2",
              "--max_eval_samples", "2", "--logging_steps", "1", "--crop_size", "64"]


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def busy_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: everything but idle and iowait)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the process group this script started (the launcher and the training process it spawned)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def launcher() -> list[str]:
    exe = shutil.which("accelerate")
    return [exe, "launch"] if exe else [sys.executable, "-m", "accelerate.commands.launch"]


class StreamReader(threading.Thread):
    """Read a pipe, split on \\n and \\r (tqdm), keep (seconds since start, line) and echo to a log file."""

    def __init__(self, pipe, start: float, log, echo: bool):
        super().__init__(daemon=True)
        self.pipe, self.start_time, self.log, self.echo = pipe, start, log, echo
        self.lines: list[tuple[float, str]] = []

    def run(self):
        buffer = ""
        while True:
            chunk = self.pipe.read1(4096) if hasattr(self.pipe, "read1") else self.pipe.read(4096)
            if not chunk:
                break
            buffer += chunk.decode("utf-8", "replace")
            parts = re.split(r"[\r\n]", buffer)
            buffer = parts.pop()
            now = time.perf_counter() - self.start_time
            for line in parts:
                if line.strip():
                    self.lines.append((now, line))
                    self.log.write(f"{now:8.2f} {line}\n")
                    if self.echo:
                        print(f"  [{now:7.1f}s] {line}", flush=True)
        if buffer.strip():
            self.lines.append((time.perf_counter() - self.start_time, buffer))


def first_time(lines, pattern: str) -> float | None:
    regex = re.compile(pattern)
    return next((t for t, line in lines if regex.search(line)), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", help="VOCSEG_CACHE to use (and keep); default: a fresh temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory (and cache)")
    parser.add_argument("--timeout", type=float, default=1800, help="kill the run after this many seconds")
    parser.add_argument("--echo", action="store_true", help="echo the run's stdout log lines as they arrive")
    parser.add_argument("--smoke", action="store_true", help="the same command with " + " ".join(SMOKE_ARGS) +
                        ": does the quick start still run (CI); the figures mean nothing and never fail it")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="vocseg-demo-"))
    run_dir = workdir / "run"
    run_dir.mkdir()  # the empty working directory the user runs in
    cache = Path(args.cache_dir).resolve() if args.cache_dir else workdir / "cache"
    reused = (cache / DEMO_DATA / "synthetic_manifest.json").exists()
    env = {**os.environ, "VOCSEG_CACHE": str(cache)}
    for key in ("DATASET_PATH", "SBD_DATASET_PATH"):
        env.pop(key, None)
    command = [*launcher(), "--cpu", str(REPO / "train.py"), *(SMOKE_ARGS if args.smoke else [])]
    accelerate_default = Path(env.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "accelerate" / \
        "default_config.yaml"

    print(f"command: (cd {run_dir} && VOCSEG_CACHE={cache} {' '.join(command)})")
    print(f"accelerate default config: {accelerate_default if accelerate_default.exists() else 'none'}; "
          f"cache {'REUSED (data + Arrow cache already built)' if reused else 'fresh'}; "
          f"{os.cpu_count()} cores; load average before: {loadavg()}", flush=True)

    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before = busy_cpu_seconds()
    start = time.perf_counter()
    # Own session: on timeout the whole group goes (accelerate launch's child train.py included)
    proc = subprocess.Popen(command, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    with open(workdir / "stdout.log", "w") as out_log, open(workdir / "stderr.log", "w") as err_log:
        out_reader = StreamReader(proc.stdout, start, out_log, args.echo)
        err_reader = StreamReader(proc.stderr, start, err_log, False)
        out_reader.start()
        err_reader.start()
        data_ready = None
        manifest = cache / DEMO_DATA / "synthetic_manifest.json"
        try:
            while proc.poll() is None:
                if data_ready is None and manifest.exists():
                    data_ready = time.perf_counter() - start
                if time.perf_counter() - start > args.timeout:
                    print(f"timeout: killing the run after {args.timeout:.0f} s", flush=True)
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                kill_group(proc)
            proc.wait()
        wall = time.perf_counter() - start
        out_reader.join()
        err_reader.join()
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    others = max(0.0, (busy_cpu_seconds() - busy_before - cpu) / wall)
    load_after = loadavg()

    out_lines, err_lines = out_reader.lines, err_reader.lines
    if proc.returncode != 0:
        print(f"\nFAILED: exit code {proc.returncode} after {wall:.1f} s; last output:")
        for _, line in (out_lines[-20:] + err_lines[-30:]):
            print("  " + line)
        print(f"logs: {workdir}")
        return 2

    results_files = sorted(run_dir.glob("outputs/*/all_results.json"))
    if not results_files:
        print(f"\nFAILED: no outputs/*/all_results.json under {run_dir}")
        return 2
    results = json.loads(results_files[-1].read_text())
    history_file = results_files[-1].parent / "eval_results.jsonl"
    history = [json.loads(line) for line in history_file.read_text().splitlines()] if history_file.exists() else []

    setup_end = first_time(out_lines, r"INFO training ")
    step_times = {int(m.group(1)): t for t, line in out_lines if (m := re.search(r"INFO step (\d+) \|", line))}
    eval_times = {int(m.group(1)): t for t, line in out_lines if (m := re.search(r"INFO eval step (\d+) \|", line))}
    summary_time = first_time(out_lines, r"^Finished \d+ steps")
    miou = results.get("eval_mean_iou")
    steps = results.get("step")

    kept = f"   (logs: {workdir})" if args.keep or args.cache_dir else "   (--keep keeps the logs)"
    print(f"\nrun: {results_files[-1].parent.relative_to(run_dir)}{kept}")
    print(f"load average after: {load_after}; child CPU time {cpu:.0f} s over {wall:.0f} s wall "
          f"({cpu / wall:.2f} cores busy on average); other processes kept {others:.2f} cores busy"
          + ("  <- the machine was shared: the wall time is pessimistic" if others > 0.2 else ""))
    print("\ntimeline (seconds since launch):")
    if data_ready is not None:
        print(f"  {data_ready:7.1f}  synthetic data tree written" + (" (already there)" if reused else ""))
    if setup_end is not None:
        print(f"  {setup_end:7.1f}  setup done (data, Arrow caches, model, accelerate.prepare): 'training ...' line")
    for step in sorted(set(step_times) | set(eval_times)):
        if step in step_times:
            print(f"  {step_times[step]:7.1f}  step {step}")
        if step in eval_times:
            print(f"  {eval_times[step]:7.1f}  eval at step {step} done")
    if summary_time is not None:
        print(f"  {summary_time:7.1f}  summary printed")
    print(f"  {wall:7.1f}  process exited")
    if len(step_times) >= 2:
        first, last = min(step_times), max(step_times)
        evals_between = sum(1 for s in eval_times if first <= s < last)
        print(f"  training pace: {(step_times[last] - step_times[first]) / (last - first):.3f} s/step between step "
              f"{first} and {last} (includes {evals_between} eval(s) + checkpoint(s) in between)")
    for record in history:
        print(f"  val mIoU at step {record['step']}: {record['eval_mean_iou']:.4f}")

    ok_miou = miou is not None and miou >= TARGET_MIOU
    ok_wall = wall <= TARGET_WALL_S
    print("\n" + f"{'quick start':32s} {'measured':>12s} {'target':>12s}")
    print(f"{'final val mIoU':32s} {miou if miou is not None else float('nan'):12.4f} {'>= ' + str(TARGET_MIOU):>12s}"
          f"   {'OK' if ok_miou else 'MISSED'}")
    print(f"{'best val mIoU (step)':32s} {results.get('best_eval_mean_iou', float('nan')):12.4f}   "
          f"(step {results.get('best_step')})")
    print(f"{'total wall time (s)':32s} {wall:12.1f} {'<= ' + str(int(TARGET_WALL_S)):>12s}   "
          f"{'OK' if ok_wall else 'MISSED'}")
    print(f"{'steps':32s} {steps:12d}")
    print(f"cache: {'reused' if reused else 'fresh (includes data generation and cache building)'}")

    if not args.keep and not args.cache_dir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if (ok_miou and ok_wall) or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
