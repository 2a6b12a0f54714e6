"""`python -m vocseg sweep --task TASK_ID --param SECTION/KEY KIND ... --queue Q`: a ClearML hyperparameter search.

    python -m vocseg sweep --task 3f2c... --queue gpus --max_jobs 20 --concurrency 2 \\
        --param Optim/learning_rate log 1e-4 1e-1 --param Data/crop_size int 256 512 64 \\
        --param Optim/optimizer choice sgd adamw

Each trial is a clone of TASK_ID with the sampled values written into its hyperparameter sections (the same
keys as the CLI and the recipes), enqueued for clearml-agent; a clone trains in its own folder and never
resumes its original (vocseg.remote). The objective is the last reported `mIoU/val`, maximised; Optuna
(TPE) when it is installed, else random search. KIND is one of:

    log LOW HIGH            log-uniform float (learning rates, weight decay)
    uniform LOW HIGH [STEP] uniform float
    int LOW HIGH [STEP]     uniform integer (crop size, batch size, steps)
    choice V1 V2 ...        one of the values (optimizer, model, true/false)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import typing

from clearml.automation import (DiscreteParameterRange, HyperParameterOptimizer, LogUniformParameterRange,
                                RandomSearch, UniformIntegerParameterRange, UniformParameterRange)

from vocseg.clearml_connection import ClearMLTimeout, deadline, deadline_seconds, server_unavailable_reason
from vocseg.config import FIELD_NAMES, ConfigError, TrainConfig, coerce_value, section_of

OBJECTIVE = ("mIoU", "val", "max")  # title, series, sign: what every vocseg run reports at each evaluation
DECIDED_BY_THE_WORKER = ("output_dir", "run_name", "resume_from_checkpoint", "clearml_queue")


class SweepError(ValueError):
    pass


def _base_type(field: str):
    hint = typing.get_type_hints(TrainConfig)[field]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) is not typing.Literal else hint


def _numbers(name: str, kind: str, values: list[str], convert, count: tuple[int, int]) -> list:
    if not count[0] <= len(values) <= count[1]:
        wanted = " ".join(("LOW", "HIGH", "[STEP]")[:count[1]])
        raise SweepError(f"--param {name} {kind}: expected {wanted}, got {' '.join(values) or 'nothing'}")
    try:
        numbers = [convert(v) for v in values]
    except ValueError:
        raise SweepError(f"--param {name} {kind}: {' '.join(values)} are not {convert.__name__} numbers") from None
    if not numbers[0] < numbers[1]:
        raise SweepError(f"--param {name} {kind}: LOW must be below HIGH, got {values[0]} {values[1]}")
    if len(numbers) == 3 and numbers[2] <= 0:
        raise SweepError(f"--param {name} {kind}: STEP must be positive, got {values[2]}")
    return numbers


def parameter_range(tokens: list[str]):
    """`["Optim/learning_rate", "log", "1e-4", "1e-1"]` -> a clearml.automation parameter range, checked against
    TrainConfig: the key must exist in that section and the values must suit its type."""
    if len(tokens) < 2:
        raise SweepError(f"--param {' '.join(tokens)}: expected SECTION/KEY KIND VALUES...")
    name, kind, values = tokens[0], tokens[1], tokens[2:]
    section, _, field = name.rpartition("/")
    if field not in FIELD_NAMES:
        raise SweepError(f"--param {name}: {field!r} is not a config key (see python train.py --help)")
    if section != section_of(field):
        raise SweepError(f"--param {name}: {field} is in section {section_of(field)}: use {section_of(field)}/{field}")
    if field in DECIDED_BY_THE_WORKER:
        raise SweepError(f"--param {name}: decided by the worker for each trial (its own folder), not sweepable")
    base = _base_type(field)
    if kind in ("log", "uniform"):
        if base is not float:
            raise SweepError(f"--param {name} {kind}: {field} is not a float (use int or choice)")
        low, high, *step = _numbers(name, kind, values, float, (2, 2) if kind == "log" else (2, 3))
        if kind == "uniform":
            return UniformParameterRange(name, min_value=low, max_value=high, step_size=step[0] if step else None)
        if low <= 0:
            raise SweepError(f"--param {name} log: LOW must be positive, got {values[0]}")
        return LogUniformParameterRange(name, min_value=math.log10(low), max_value=math.log10(high), base=10)
    if kind == "int":
        if base is not int:
            raise SweepError(f"--param {name} int: {field} is not an integer (use log, uniform or choice)")
        low, high, *step = _numbers(name, kind, values, int, (2, 3))
        return UniformIntegerParameterRange(name, min_value=low, max_value=high, step_size=step[0] if step else 1)
    if kind == "choice":
        if not values:
            raise SweepError(f"--param {name} choice: give at least one value")
        hint = typing.get_type_hints(TrainConfig)[field]
        try:
            for value in values:
                coerce_value(hint, value, field)
        except ConfigError as error:
            raise SweepError(f"--param {name} choice: {error}") from None
        return DiscreteParameterRange(name, values=list(values))
    raise SweepError(f"--param {name}: unknown kind {kind!r} (log, uniform, int or choice)")


def search_strategy(name: str):
    """Optuna's TPE when optuna is installed (or asked for), else ClearML's random search."""
    has_optuna = importlib.util.find_spec("optuna") is not None
    if name == "optuna" and not has_optuna:
        raise SweepError("--strategy optuna: optuna is not installed (pip install optuna)")
    if name == "optuna" or (name == "auto" and has_optuna):
        from clearml.automation.optuna import OptimizerOptuna

        return OptimizerOptuna
    return RandomSearch


def build_optimizer(args, parameters: list, strategy):
    """ClearML's controller: clones args.task per trial with sampled values, enqueues it, reads mIoU/val back."""
    title, series, sign = OBJECTIVE
    return HyperParameterOptimizer(
        base_task_id=args.task, hyper_parameters=parameters,
        objective_metric_title=title, objective_metric_series=series, objective_metric_sign=sign,
        optimizer_class=strategy, execution_queue=args.queue, max_number_of_concurrent_tasks=args.concurrency,
        total_max_jobs=args.max_jobs, optimization_time_limit=args.time_limit_minutes,
        time_limit_per_job=args.job_time_limit_minutes, compute_time_limit=None,
        max_iteration_per_job=None, min_iteration_per_job=None, pool_period_min=args.poll_minutes,
        save_top_k_tasks_only=None)


def controller_task(base_task_id: str):
    """The sweep's own ClearML task (type optimizer), in the base task's project."""
    from clearml import Task

    base = Task.get_task(task_id=base_task_id)
    return Task.init(project_name=base.get_project_name(), task_name=f"sweep: {base.name}",
                     task_type=Task.TaskTypes.optimizer, reuse_last_task_id=False, auto_connect_arg_parser=False,
                     auto_connect_frameworks=False)


def describe(parameters: list) -> list[str]:
    lines = []
    for p in parameters:
        if isinstance(p, LogUniformParameterRange):
            lines.append(f"  {p.name}: log-uniform {10 ** p.min_value:g} .. {10 ** p.max_value:g}")
        elif isinstance(p, (UniformParameterRange, UniformIntegerParameterRange)):
            step = f" step {p.step_size:g}" if p.step_size else ""
            lines.append(f"  {p.name}: uniform {p.min_value:g} .. {p.max_value:g}{step}")
        else:
            lines.append(f"  {p.name}: one of {', '.join(map(str, p.values))}")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m vocseg sweep", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--task", required=True, help="the base task to clone for every trial (a finished vocseg run)")
    parser.add_argument("--param", nargs="+", action="append", required=True, metavar="SECTION/KEY KIND VALUES",
                        help="a hyperparameter to search (repeat for several)")
    parser.add_argument("--queue", default="default", help="clearml-agent queue the trials are enqueued on")
    parser.add_argument("--max_jobs", type=int, default=20, help="trials in total")
    parser.add_argument("--concurrency", type=int, default=2, help="trials running at the same time")
    parser.add_argument("--time_limit_minutes", type=float, help="stop the whole sweep after this long")
    parser.add_argument("--job_time_limit_minutes", type=float, help="abort a trial running longer than this")
    parser.add_argument("--poll_minutes", type=float, default=1.0, help="how often trials are checked")
    parser.add_argument("--strategy", choices=("auto", "optuna", "random"), default="auto",
                        help="auto: optuna when installed, else random search")
    parser.add_argument("--dry_run", action="store_true", help="check and print the search space, start nothing")
    args = parser.parse_args(argv)
    for name in ("max_jobs", "concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        parameters = [parameter_range(tokens) for tokens in args.param]
        strategy = search_strategy(args.strategy)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"sweep over {len(parameters)} hyperparameter(s), objective {'/'.join(OBJECTIVE[:2])} "
          f"({OBJECTIVE[2]}), {strategy.__name__}, {args.max_jobs} trials, {args.concurrency} at a time, "
          f"queue {args.queue}:", *describe(parameters), sep="\n")
    if args.dry_run:
        return 0
    reason = server_unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    try:  # the set-up calls are bounded; the sweep itself then runs as long as its budget says
        with deadline(deadline_seconds(), f"setting up the sweep of task {args.task} on the ClearML server"):
            task = controller_task(args.task)
            optimizer = build_optimizer(args, parameters, strategy)
    except ClearMLTimeout as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"sweep task {task.id}: trials are clones of {args.task} on queue {args.queue}", flush=True)
    optimizer.start()
    optimizer.wait()
    top = optimizer.get_top_experiments(top_k=3)
    optimizer.stop()
    for trial in top:
        print(f"  {trial.id}  {trial.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
