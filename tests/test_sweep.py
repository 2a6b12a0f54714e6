"""`python -m vocseg sweep`: the search space checked against TrainConfig, and the ClearML
HyperParameterOptimizer built with the right ranges, objective, queue and budget. The optimizer needs a
server (it validates the base task there), so its class is replaced by a recorder; the keyword arguments
are checked against the real constructor's signature."""

import importlib.util
import inspect
import math

import pytest
from clearml.automation import (DiscreteParameterRange, HyperParameterOptimizer, LogUniformParameterRange,
                                RandomSearch, UniformIntegerParameterRange, UniformParameterRange)

from vocseg.cli import sweep
from vocseg.cli.sweep import SweepError, parameter_range


class RecordingOptimizer:
    """Stands in for HyperParameterOptimizer: keeps its arguments, runs nothing."""
    instances = []

    def __init__(self, **kwargs):
        inspect.signature(HyperParameterOptimizer).bind(**kwargs)  # the real one accepts exactly these
        self.kwargs, self.calls = kwargs, []
        RecordingOptimizer.instances.append(self)

    def start(self):
        self.calls.append("start")

    def wait(self):
        self.calls.append("wait")

    def stop(self):
        self.calls.append("stop")

    def get_top_experiments(self, top_k):
        return []


class FakeControllerTask:
    id = "sweep-controller-id"


def test_log_range_holds_exponents_and_samples_inside_the_bounds():
    p = parameter_range(["Optim/learning_rate", "log", "1e-4", "1e-1"])
    assert isinstance(p, LogUniformParameterRange) and p.name == "Optim/learning_rate"
    assert (p.min_value, p.max_value, p.base) == (pytest.approx(-4), pytest.approx(-1), 10)
    samples = [p.get_value()["Optim/learning_rate"] for _ in range(200)]
    assert all(1e-4 <= s <= 1e-1 for s in samples)
    assert sum(s < 1e-3 for s in samples) > 30  # log-uniform: a third of the draws in the lowest decade


def test_integer_uniform_and_choice_ranges():
    crop = parameter_range(["Data/crop_size", "int", "256", "512", "64"])
    assert isinstance(crop, UniformIntegerParameterRange)
    assert [v["Data/crop_size"] for v in crop.to_list()] == [256, 320, 384, 448, 512]
    decay = parameter_range(["Optim/weight_decay", "uniform", "0", "0.001"])
    assert isinstance(decay, UniformParameterRange) and not isinstance(decay, LogUniformParameterRange)
    assert (decay.min_value, decay.max_value, decay.step_size) == (0.0, 0.001, None)
    optimizer = parameter_range(["Optim/optimizer", "choice", "sgd", "adamw"])
    assert isinstance(optimizer, DiscreteParameterRange) and optimizer.values == ["sgd", "adamw"]
    flag = parameter_range(["Data/photometric", "choice", "true", "false"])
    assert flag.values == ["true", "false"]


@pytest.mark.parametrize("tokens,message", [
    (["Optim/lr", "log", "1e-4", "1e-1"], "'lr' is not a config key"),
    (["Data/learning_rate", "log", "1e-4", "1e-1"], "learning_rate is in section Optim: use Optim/learning_rate"),
    (["learning_rate", "log", "1e-4", "1e-1"], "use Optim/learning_rate"),
    (["Optim/optimizer", "choice", "sgd", "adam"], "'adam' is not one of sgd, adamw"),
    (["Data/crop_size", "log", "1", "2"], "crop_size is not a float"),
    (["Optim/learning_rate", "int", "1", "2"], "learning_rate is not an integer"),
    (["Optim/learning_rate", "log", "0", "1"], "LOW must be positive"),
    (["Optim/learning_rate", "log", "1e-1", "1e-4"], "LOW must be below HIGH"),
    (["Optim/learning_rate", "log", "1e-4"], "expected LOW HIGH"),
    (["Optim/learning_rate", "log", "small", "big"], "are not float numbers"),
    (["Data/crop_size", "int", "256", "512", "0"], "STEP must be positive"),
    (["Data/crop_size", "choice", "256", "big"], "crop_size"),
    (["Optim/learning_rate", "gauss", "0", "1"], "unknown kind 'gauss'"),
    (["General/output_dir", "choice", "a", "b"], "decided by the worker"),
    (["General/resume_from_checkpoint", "choice", "latest"], "decided by the worker"),
])
def test_bad_parameters_are_one_line_errors_naming_the_key(tokens, message):
    with pytest.raises(SweepError, match=message) as error:
        parameter_range(tokens)
    assert "\n" not in str(error.value)


def test_the_strategy_is_optuna_when_installed_else_random_search():
    expected = "OptimizerOptuna" if importlib.util.find_spec("optuna") else "RandomSearch"
    assert sweep.search_strategy("auto").__name__ == expected
    assert sweep.search_strategy("random") is RandomSearch
    if not importlib.util.find_spec("optuna"):
        with pytest.raises(SweepError, match="optuna is not installed"):
            sweep.search_strategy("optuna")


def test_the_sweep_builds_the_optimizer_with_the_ranges_objective_queue_and_budget(monkeypatch, capsys):
    RecordingOptimizer.instances.clear()
    monkeypatch.setattr(sweep, "HyperParameterOptimizer", RecordingOptimizer)
    monkeypatch.setattr(sweep, "server_unavailable_reason", lambda: None)
    monkeypatch.setattr(sweep, "controller_task", lambda task_id: FakeControllerTask())
    rc = sweep.main(["--task", "base123", "--queue", "gpus", "--max_jobs", "12", "--concurrency", "3",
                     "--time_limit_minutes", "600", "--job_time_limit_minutes", "90", "--strategy", "random",
                     "--param", "Optim/learning_rate", "log", "1e-4", "1e-1",
                     "--param", "Data/crop_size", "int", "256", "512", "128",
                     "--param", "Optim/optimizer", "choice", "sgd", "adamw"])
    assert rc == 0
    [optimizer] = RecordingOptimizer.instances
    kwargs = optimizer.kwargs
    assert kwargs["base_task_id"] == "base123"
    assert (kwargs["objective_metric_title"], kwargs["objective_metric_series"],
            kwargs["objective_metric_sign"]) == ("mIoU", "val", "max")
    assert kwargs["optimizer_class"] is RandomSearch
    assert kwargs["execution_queue"] == "gpus" and kwargs["max_number_of_concurrent_tasks"] == 3
    assert kwargs["total_max_jobs"] == 12 and kwargs["optimization_time_limit"] == 600
    assert kwargs["time_limit_per_job"] == 90
    # The search strategy gets the per-job keywords: RandomSearch (and OptimizerOptuna) accept them.
    strategy_kwargs = {k: kwargs[k] for k in ("total_max_jobs", "time_limit_per_job", "max_iteration_per_job",
                                              "min_iteration_per_job", "pool_period_min")}
    inspect.signature(RandomSearch).bind(base_task_id="b", hyper_parameters=[], objective_metric=None,
                                         execution_queue="q", num_concurrent_workers=1, **strategy_kwargs)
    lr, crop, choice = kwargs["hyper_parameters"]
    assert lr.name == "Optim/learning_rate" and math.isclose(lr.min_value, -4) and math.isclose(lr.max_value, -1)
    assert [v["Data/crop_size"] for v in crop.to_list()] == [256, 384, 512]
    assert choice.values == ["sgd", "adamw"]
    assert optimizer.calls == ["start", "wait", "stop"]
    out = capsys.readouterr().out
    assert "Optim/learning_rate: log-uniform 0.0001 .. 0.1" in out and "queue gpus" in out
    assert "trials are clones of base123" in out


def test_a_bad_parameter_stops_the_sweep_before_any_server_call(monkeypatch, capsys):
    monkeypatch.setattr(sweep, "server_unavailable_reason", lambda: pytest.fail("no server call expected"))
    assert sweep.main(["--task", "t", "--param", "Optim/lr", "log", "1e-4", "1e-1"]) == 2
    expected = "error: --param Optim/lr: 'lr' is not a config key (see python train.py --help)"
    assert capsys.readouterr().err.strip() == expected


def test_dry_run_prints_the_space_and_needs_no_server(monkeypatch, capsys):
    monkeypatch.setattr(sweep, "server_unavailable_reason", lambda: pytest.fail("no server call expected"))
    assert sweep.main(["--task", "t", "--dry_run", "--param", "Optim/optimizer", "choice", "sgd", "adamw"]) == 0
    assert "Optim/optimizer: one of sgd, adamw" in capsys.readouterr().out
