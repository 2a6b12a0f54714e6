"""ClearML offline sessions: hyperparameters, scalars, plots, samples; server overrides; no network; compare."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

import vocseg.engine as engine
from vocseg.cli import compare
from vocseg.config import ConfigError, TrainConfig, coerce_value
from vocseg.constants import VOC_CLASSES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clearml_env(monkeypatch, tmp_path):
    """No server configured: vocseg must choose offline mode by itself."""
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml"))
    monkeypatch.setenv("CLEARML_CONFIG_FILE", str(tmp_path / "no-clearml.conf"))
    for name in ("CLEARML_API_HOST", "CLEARML_OFFLINE_MODE", "CLEARML_TASK_ID", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield tmp_path / "clearml" / "offline"
    AcceleratorState._reset_state(reset_partial_state=True)


def run_config(tree, out, cache, **overrides) -> TrainConfig:
    values = dict(data_root=str(tree), train_split="train", val_split="val", model="segformer-b0", crop_size=48,
                  per_device_train_batch_size=4, num_workers=0, optimizer="adamw", learning_rate=1e-3,
                  max_train_steps=4, eval_steps=2, checkpointing_steps=4, logging_steps=1, output_dir=str(out),
                  cache_dir=str(cache), seed=0, recipe="test", tracker="clearml", num_debug_samples=2,
                  max_eval_samples=3)
    values.update(overrides)
    return TrainConfig(**values)


def sessions(offline_root: Path) -> list[Path]:
    return sorted(p for p in offline_root.glob("offline-*") if p.is_dir())


def events(session: Path) -> list[dict]:
    return [e for line in (session / "metrics.jsonl").read_text().splitlines() for e in json.loads(line)]


def test_offline_session_holds_hyperparameters_scalars_plots_and_samples(synthetic_tree, tmp_path, clearml_env):
    tree, _ = synthetic_tree
    results = engine.train(run_config(tree, tmp_path / "run", tmp_path / "cache", run_name="tracked"))
    [session] = sessions(clearml_env)
    assert results["clearml_offline_session"] == f"{session}.zip" and Path(f"{session}.zip").is_file()

    task = json.loads((session / "task.json").read_text())
    assert task["name"] == "tracked" and task["project_name"] == "Pascal-VOC12 Training"
    hyper = task["hyperparams"]
    assert {"General", "Data", "Model", "Optim"} <= set(hyper)
    assert hyper["Optim"]["learning_rate"]["value"] == "0.001"
    assert hyper["Model"]["model"]["value"] == "segformer-b0"
    assert hyper["Data"]["crop_size"]["value"] == "48"
    assert hyper["General"]["max_train_steps"]["value"] == "4"

    all_events = events(session)
    scalars = {}
    for e in all_events:
        if e["type"] == "training_stats_scalar":
            scalars.setdefault((e["metric"], e["variant"]), []).append(e["iter"])
    assert scalars[("loss", "train")] == [1, 2, 3, 4]
    assert scalars[("learning_rate", "backbone_decay")] == [1, 2, 3, 4]
    assert scalars[("learning_rate", "head_decay")] == [1, 2, 3, 4]
    assert scalars[("throughput", "images_per_s")] == [1, 2, 3, 4]
    assert scalars[("memory_gb", "cpu")] == [1, 2, 3, 4]
    assert scalars[("grad_norm", "train")] == [1, 2, 3, 4]  # measured even without clipping
    for title in ("mIoU", "mAcc", "aAcc"):
        assert scalars[(title, "val")] == [2, 4]
    per_class = {series for (title, series) in scalars if title == "IoU per class"}
    assert per_class and per_class <= set(VOC_CLASSES)

    plots = [e for e in all_events if e["type"] == "plot"]
    assert sorted(e["iter"] for e in plots if "Confusion matrix" in e["metric"]) == [2, 4]
    confusion = json.loads(next(e for e in plots if "Confusion matrix" in e["metric"])["plot_str"])
    assert len(confusion["data"][0]["z"]) == len(VOC_CLASSES)

    images = [e for e in all_events if e["type"] == "training_debug_image"]
    first_val_ids = {row for row in (tree / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[:2]}
    assert {e["variant"] for e in images} == first_val_ids  # the same ids at every evaluation
    assert sorted(e["iter"] for e in images) == [2, 2, 4, 4]
    assert all(Path(e["url"]).is_file() for e in images)


@pytest.fixture
def edited_clone():
    """`edited_clone(edits)`: the run replays a clone edited in the UI (tests/helpers/clearml_clone.py)."""
    from tests.helpers.clearml_clone import replay_edited_clone

    undo = []
    yield lambda edits: undo.append(replay_edited_clone(edits))
    for step in undo:
        step()


def test_server_overrides_are_used(synthetic_tree, tmp_path, clearml_env, edited_clone):
    """A clone edited in the UI holds strings; ClearML's real Task.connect (remote branch, no patch) casts them by
    the connected defaults' types, vocseg converts the rest (None defaults stay strings there), and the run
    trains with the typed values."""
    tree, _ = synthetic_tree
    edited_clone({"Optim": {"learning_rate": "0.0123", "max_grad_norm": "0.5", "optimizer": "sgd"},
                  "General": {"max_train_steps": "3"},  # None by default: ClearML hands back the string "3"
                  "Data": {"crop_size": "40", "photometric": "true"}, "Model": {"aux_loss": "False"}})
    out = tmp_path / "override"
    results = engine.train(run_config(tree, out, tmp_path / "cache", eval_steps=3, checkpointing_steps=3))
    assert results["step"] == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())
    typed = {key: saved[key] for key in ("learning_rate", "max_grad_norm", "optimizer", "max_train_steps",
                                         "crop_size", "photometric", "aux_loss", "model", "seed")}
    assert typed == {"learning_rate": 0.0123, "max_grad_norm": 0.5, "optimizer": "sgd", "max_train_steps": 3,
                     "crop_size": 40, "photometric": True, "aux_loss": False, "model": "segformer-b0", "seed": 0}
    assert [type(typed[k]) for k in ("learning_rate", "max_train_steps", "crop_size", "photometric")] == [
        float, int, int, bool]
    lrs = [e["value"] for e in events(sessions(clearml_env)[0])
           if e.get("metric") == "learning_rate" and e["variant"] == "backbone_decay"]
    assert lrs[0] == pytest.approx(0.0123 * (1 - 1 / 3) ** 0.9, rel=1e-6)  # poly 0.9, after step 1 of 3


def test_offline_task_reports_without_a_subprocess(tmp_path, clearml_env):
    """Offline, ClearML's reporting subprocess would only append to local files: vocseg turns it off."""
    import psutil

    from vocseg.tracking import Reporter, start_task

    before = set(psutil.Process().children(recursive=True))  # e.g. multiprocessing's resource tracker
    task, offline = start_task(TrainConfig(run_name="threads", model="segformer-b0"), 1, "no")
    assert offline
    children = [p for p in psutil.Process().children(recursive=True) if p not in before]
    reporter = Reporter(task, offline)
    for step in range(1, 51):
        reporter.train(step, {"train_loss": 1.0 / step})
    zip_path = Path(reporter.close())
    assert children == [], f"ClearML started {children}"
    session = zip_path.with_suffix("")
    losses = [e for e in events(session) if e.get("metric") == "loss"]
    assert [e["iter"] for e in losses] == list(range(1, 51)) and zip_path.is_file()


def test_offline_run_opens_no_network_connection(synthetic_tree, tmp_path, clearml_env, monkeypatch):
    tree, _ = synthetic_tree
    contacted = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("::1", "localhost") or "/" in host):
            contacted.append(address)
            raise OSError(f"test forbids network access to {address}")
        return real_connect(sock, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            contacted.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    engine.train(run_config(tree, tmp_path / "net", tmp_path / "cache", max_train_steps=2, eval_steps=2,
                            checkpointing_steps=2))
    assert sessions(clearml_env)
    assert contacted == []


def test_unreachable_server_falls_back_to_offline(synthetic_tree, tmp_path, clearml_env, monkeypatch, capsys):
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CLEARML_API_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLEARML_WEB_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLEARML_FILES_HOST", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("CLEARML_API_ACCESS_KEY", "test")
    monkeypatch.setenv("CLEARML_API_SECRET_KEY", "test")
    tree, _ = synthetic_tree
    results = engine.train(run_config(tree, tmp_path / "fallback", tmp_path / "cache", max_train_steps=2,
                                      eval_steps=2, checkpointing_steps=2))
    assert results["step"] == 2 and results["clearml_offline_session"]
    assert f"127.0.0.1:{port} is unreachable" in capsys.readouterr().out


def test_compare_two_offline_sessions(synthetic_tree, tmp_path, clearml_env):
    tree, _ = synthetic_tree
    for name, lr in (("lr-small", 1e-3), ("lr-large", 5e-3)):
        engine.train(run_config(tree, tmp_path / name, tmp_path / "cache", run_name=name, learning_rate=lr,
                                max_train_steps=2, eval_steps=2, checkpointing_steps=2))
        AcceleratorState._reset_state(reset_partial_state=True)
    first, second = sessions(clearml_env)
    result = subprocess.run([sys.executable, "-m", "vocseg", "compare", str(first), f"{second}.zip",
                             "--markdown", str(tmp_path / "cmp.md")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    lr_line = next(line for line in lines if line.startswith("Optim/learning_rate"))
    assert "0.001" in lr_line and "0.005" in lr_line
    assert "lr-small" in lines[0] and "lr-large" in lines[0]
    miou_line = next(line for line in lines if line.startswith("mIoU (val) final"))
    runs = [compare.load_run(str(first)), compare.load_run(f"{second}.zip")]
    for run in runs:
        assert f"{run['scalars']['mIoU']['val'][-1][1]:.4f}" in miou_line
    assert not any(line.startswith("Model/model") for line in lines)  # equal values are not listed
    assert "| Optim/learning_rate |" in (tmp_path / "cmp.md").read_text()


@pytest.mark.parametrize("annotation,value,expected", [
    (float, "0.02", 0.02), (int | None, "", None), (int | None, "None", None), (int, "3", 3),
    (bool, "False", False), (bool | None, "true", True), (str | None, "abc", "abc"), (int, "4.0", 4)])
def test_values_from_the_server_are_converted_back(annotation, value, expected):
    assert coerce_value(annotation, value) == expected


def test_bad_value_from_the_server_names_the_key():
    import typing
    with pytest.raises(ConfigError, match="learning_rate"):
        coerce_value(float, "fast", "learning_rate")
    with pytest.raises(ConfigError, match="optimizer"):
        coerce_value(typing.Literal["sgd", "adamw"], "adam", "optimizer")
