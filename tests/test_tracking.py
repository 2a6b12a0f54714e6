"""ClearML offline sessions: hyperparameters, scalars, plots, samples; server overrides; no network; compare."""

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

import vocseg.engine as engine
from vocseg.cli import clearml_import, compare
from vocseg.config import ConfigError, TrainConfig, coerce_value
from vocseg.constants import VOC_CLASSES
from vocseg.provenance import script_info
from vocseg.tracking import register_best_model

REPO = Path(__file__).resolve().parent.parent


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
    assert hyper["General"]["mixed_precision"]["value"] == "no"  # recorded resolved, for replays
    assert hyper["properties"]["run_folder"]["value"] == str((tmp_path / "run").resolve())
    # What an agent needs to re-run the session once imported (recorded offline from local git reads).
    script = task["script"]
    assert script["entry_point"] == "train.py" and script["working_dir"] == "."
    assert "torch==" in script["requirements"]["pip"] and "vocseg" not in script["requirements"]["pip"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout (not an unpacked archive)
        assert script["version_num"] == head.stdout.strip() and script["repository"]
    assert hyper["Optim"]["learning_rate"]["value"] == "0.001"
    assert hyper["Model"]["model"]["value"] == "segformer-b0"
    assert hyper["Data"]["crop_size"]["value"] == "48"
    assert hyper["General"]["max_train_steps"]["value"] == "4"

    # clearml-import finds the run folder and its best model from the session alone.
    assert clearml_import.recorded_run_folder(Path(f"{session}.zip")) == (tmp_path / "run").resolve()
    assert clearml_import.best_model_scores(tmp_path / "run" / "best_model") == (
        results["best_step"], pytest.approx(results["best_eval_mean_iou"]))

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


def test_server_overrides_are_used(synthetic_tree, tmp_path, clearml_env, edited_clone, monkeypatch):
    """A clone edited in the UI holds strings; ClearML's real Task.connect (remote branch, no patch) casts them by
    the connected defaults' types, vocseg converts the rest (None defaults stay strings there), and the run
    trains with the typed values, in the replay's own folder (never the recorded output_dir)."""
    tree, _ = synthetic_tree
    monkeypatch.setenv("VOCSEG_OUTPUT_ROOT", str(tmp_path / "replays"))
    edited_clone({"Optim": {"learning_rate": "0.0123", "max_grad_norm": "0.5", "optimizer": "sgd"},
                  "General": {"max_train_steps": "3"},  # None by default: ClearML hands back the string "3"
                  "Data": {"crop_size": "40", "photometric": "true"}, "Model": {"aux_loss": "False"}})
    recorded = tmp_path / "override"
    results = engine.train(run_config(tree, recorded, tmp_path / "cache", eval_steps=3, checkpointing_steps=3))
    assert results["step"] == 3
    assert not recorded.exists()
    [out] = (tmp_path / "replays").iterdir()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    typed = {key: saved[key] for key in ("learning_rate", "max_grad_norm", "optimizer", "max_train_steps",
                                         "crop_size", "photometric", "aux_loss", "model", "seed")}
    assert typed == {"learning_rate": 0.0123, "max_grad_norm": 0.5, "optimizer": "sgd", "max_train_steps": 3,
                     "crop_size": 40, "photometric": "jitter", "aux_loss": False, "model": "segformer-b0", "seed": 0}
    assert [type(typed[k]) for k in ("learning_rate", "max_train_steps", "crop_size", "aux_loss")] == [
        float, int, int, bool]  # "true" for photometric is the older recipes' spelling of jitter
    lrs = [e["value"] for e in events(sessions(clearml_env)[0])
           if e.get("metric") == "learning_rate" and e["variant"] == "backbone_decay"]
    assert lrs[0] == pytest.approx(0.0123 * (1 - 1 / 3) ** 0.9, rel=1e-6)  # poly 0.9, after step 1 of 3


def test_offline_task_reports_without_a_subprocess(tmp_path, clearml_env):
    """Offline, ClearML's reporting subprocess would only append to local files: vocseg turns it off."""
    import psutil

    from vocseg.tracking import Reporter, start_task

    before = set(psutil.Process().children(recursive=True))  # e.g. multiprocessing's resource tracker
    task, offline = start_task(TrainConfig(run_name="threads", model="segformer-b0"), 1)
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


def test_script_info_reads_repository_commit_and_uncommitted_diff_locally(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    git("init", "-q", "-b", "main")
    (repo / "train.py").write_text("print('v1')\n")
    git("add", "train.py")
    git("commit", "-q", "-m", "first")
    git("remote", "add", "origin", "https://example.com/team/vocseg.git")
    (repo / "train.py").write_text("print('v2')\n")  # uncommitted
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()

    info = script_info(repo / "train.py", cwd=repo / "sub")
    assert info.repository == "https://example.com/team/vocseg.git" and info.branch == "main"
    assert info.commit == commit and len(commit) == 40
    assert info.working_dir == "sub" and info.entry_point == "../train.py"
    assert "-print('v1')\n+print('v2')\n" in info.diff and info.diff.endswith("\n")
    # The diff applies to the recorded commit: what an agent does after checking it out.
    git("stash")
    subprocess.run(["git", "-C", str(repo), "apply"], input=info.diff, text=True, check=True)
    assert (repo / "train.py").read_text() == "print('v2')\n"
    assert script_info(tmp_path / "elsewhere.py") is None  # not in a git work tree


class RecordingOutputModel:
    """Stands in for clearml.OutputModel (registering needs a server): records what the run asks of it."""
    created = []

    def __init__(self, task=None, name=None, framework=None, label_enumeration=None, comment=None):
        self.init = dict(task=task, name=name, framework=framework, label_enumeration=label_enumeration)
        self.calls, self.id = [], f"model-{len(RecordingOutputModel.created)}"
        RecordingOutputModel.created.append(self)

    def update_weights_package(self, **kwargs):
        self.calls.append(("update_weights_package", kwargs))

    def update_weights(self, **kwargs):
        self.calls.append(("update_weights", kwargs))

    def set_all_metadata(self, metadata, replace=True):
        self.calls.append(("set_all_metadata", metadata))


class UploadingTask:
    output_uri = "s3://bucket/models"

    def get_logger(self):
        return object()  # only the presence matters here: it makes the Reporter active


def test_best_model_is_registered_as_the_whole_export_folder_with_metadata(tmp_path, monkeypatch):
    import clearml
    from vocseg.constants import LABEL2ID
    from vocseg.tracking import Reporter

    RecordingOutputModel.created.clear()
    monkeypatch.setattr(clearml, "OutputModel", RecordingOutputModel)
    task = UploadingTask()
    reporter = Reporter(task, offline=False)
    reporter.best_model(tmp_path / "best_model", step=4, miou=0.5)
    reporter.best_model(tmp_path / "best_model", step=8, miou=0.625)
    [model] = RecordingOutputModel.created  # one registry entry, updated at each improvement
    assert model.init == dict(task=task, name="best_model", framework="PyTorch", label_enumeration=LABEL2ID)
    package = [kwargs for name, kwargs in model.calls if name == "update_weights_package"]
    assert package == [dict(weights_path=str((tmp_path / "best_model").resolve()), upload_uri=None,
                            target_filename="best_model", iteration=step, auto_delete_file=False) for step in (4, 8)]
    assert model.calls[-1] == ("set_all_metadata", {"mIoU": {"value": "0.625000", "type": "float"},
                                                    "step": {"value": "8", "type": "int"}})

    task.output_uri = None  # nowhere to upload: the folder is registered where it is
    registered = register_best_model(task, tmp_path / "best_model", step=2, miou=0.25)
    assert registered.calls[0] == ("update_weights", dict(register_uri=str((tmp_path / "best_model").resolve()),
                                                          iteration=2))

    Reporter(task, offline=True).best_model(tmp_path / "best_model", step=1, miou=0.1)
    assert len(RecordingOutputModel.created) == 2  # offline: nothing registered (clearml-import does it)


def test_the_registered_package_reloads_into_the_same_model(tmp_path):
    """The package ClearML builds from best_model/ (its own update_weights_package code, the upload replaced)
    extracted the way InputModel.get_local_copy does, then vocseg.models.load_model: same weights."""
    import shutil

    import torch
    from clearml import OutputModel, StorageManager

    from vocseg.models import build_model, export_model, load_model

    model = build_model(TrainConfig(model="segformer-b0"))
    export = export_model(model, tmp_path / "best_model", extra={"eval_mean_iou": 0.5, "step": 3})

    class Uploader:  # the part of OutputModel below update_weights_package: keep the zip it would upload
        comment, _log = None, logging.getLogger("test")

        def update_weights(self, weights_filename, **kwargs):
            shutil.copy(weights_filename, tmp_path / "uploaded.zip")

        def _set_package_tag(self):
            pass

    OutputModel.update_weights_package(Uploader(), weights_path=str(export), target_filename="best_model",
                                       iteration=3, auto_delete_file=False)
    assert sorted(p.name for p in export.iterdir())  # auto_delete_file=False: the export folder is untouched
    local = StorageManager.get_local_copy((tmp_path / "uploaded.zip").as_uri(), extract_archive=True)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocseg_model.json"} <= {
        p.name for p in Path(local).iterdir()}
    reloaded = load_model(local)
    original, loaded = model.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)


class ImportedTask:
    """The task clearml-import created (Task.get_task replaced: no server here)."""
    output_uri = None

    def __init__(self):
        self.status_calls = []

    def mark_started(self, force=False):
        self.status_calls.append(("started", force))

    def mark_completed(self, **kwargs):
        self.status_calls.append(("completed", kwargs))


def test_clearml_import_registers_the_runs_best_model_from_its_folder(tmp_path, monkeypatch):
    import clearml

    from vocseg.models import META_FILE

    RecordingOutputModel.created.clear()
    monkeypatch.setattr(clearml, "OutputModel", RecordingOutputModel)
    task = ImportedTask()
    monkeypatch.setattr(clearml.Task, "get_task", staticmethod(lambda task_id: task))
    run = tmp_path / "run"
    assert "no trained best model" in clearml_import.register_run_best_model("t1", run, None)
    assert "pass --run_dir" in clearml_import.register_run_best_model("t1", None, None)
    assert RecordingOutputModel.created == []

    (run / "best_model").mkdir(parents=True)
    (run / "best_model" / META_FILE).write_text(json.dumps({"model": "segformer-b0", "eval_mean_iou": 0.75,
                                                            "step": 40}))
    line = clearml_import.register_run_best_model("t1", run, "s3://bucket/models")
    assert "mIoU 0.7500 at step 40" in line and "uploaded to s3://bucket/models" in line
    [model] = RecordingOutputModel.created
    assert model.init["task"] is task and model.init["name"] == "best_model"
    assert model.calls[0] == ("update_weights_package", dict(
        weights_path=str((run / "best_model").resolve()), upload_uri="s3://bucket/models",
        target_filename="best_model", iteration=40, auto_delete_file=False))
    assert model.calls[1][1]["mIoU"]["value"] == "0.750000"
    assert [c[0] for c in task.status_calls] == ["started", "completed"]
