"""Run train.py the way clearml-agent does (`python train.py`, CLEARML_TASK_ID set, no arguments), with the
ClearML server replaced by fakes: no server or agent exists on these machines.

The fakes hand back the task in $VOCSEG_TEST_RECORDED_TASK ({"id", "name", "parameters": {"General/...": "..."}},
values as strings, as the server returns them) and print every write the run makes to the server as a
`FAKE-CLEARML ...` line. os.execv is replaced by a print, so a relaunch shows its command instead of running.

    python tests/helpers/train_as_clearml_agent.py train.py
"""

import json
import os
import runpy
import shlex
import sys

import clearml

RECORDED = json.loads(os.environ["VOCSEG_TEST_RECORDED_TASK"])


def report(*words) -> None:
    print("FAKE-CLEARML", *words, flush=True)


class FakeLogger:
    def __getattr__(self, name):  # report_scalar, report_image, ...: accepted, not recorded
        return lambda *args, **kwargs: None


class FakeTask:
    """The task as the agent runs it: it exists on the server with its recorded (maybe edited) values."""
    id, name, output_uri = RECORDED["id"], RECORDED["name"], None

    def running_locally(self):
        return False

    def get_parameters(self):
        return dict(RECORDED["parameters"])

    def connect(self, mutable, name=None):
        return {key: RECORDED["parameters"].get(f"{name}/{key}", value) for key, value in mutable.items()}

    def set_parameter(self, name, value, *args, **kwargs):
        report("set_parameter", name, json.dumps(value))

    def set_user_properties(self, **properties):
        report("set_user_properties", json.dumps(properties))

    def set_configuration_object(self, name, *args, **kwargs):
        report("set_configuration_object", name)

    def get_logger(self):
        return FakeLogger()

    def upload_artifact(self, name, *args, **kwargs):
        report("upload_artifact", name)

    def get_offline_mode_folder(self):
        return None

    def close(self):
        report("close")


class FakeOutputModel:
    def __init__(self, task=None, name=None, **kwargs):
        report("OutputModel", name)
        self.id = "fake-model-id"

    def update_weights_package(self, **kwargs):
        report("update_weights_package", json.dumps(kwargs))

    def update_weights(self, **kwargs):
        report("update_weights", json.dumps(kwargs))

    def set_all_metadata(self, metadata, replace=True):
        report("set_all_metadata", json.dumps(metadata))


def get_task(task_id=None, **kwargs):
    report("get_task", task_id)
    assert task_id == FakeTask.id, f"the replay asked for task {task_id}, not its own"
    return FakeTask()


def init(**kwargs):
    report("Task.init")
    return FakeTask()


def execv(path, argv):
    print("EXECV", shlex.join(argv), flush=True)
    sys.exit(0)


clearml.Task.get_task = staticmethod(get_task)
clearml.Task.init = staticmethod(init)
clearml.OutputModel = FakeOutputModel
os.execv = execv
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python train.py` would set it
runpy.run_path(sys.argv[0], run_name="__main__")
