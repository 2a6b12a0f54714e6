"""Run train.py as if a ClearML server handed back edited hyperparameters (a clone edited in the UI).

Every rank runs this file; only the main process calls Task.connect, so the other ranks can only
learn the edited values through vocseg's broadcast.
"""

import json
import os
import runpy
import sys

from clearml import Task

OVERRIDES = json.loads(os.environ["VOCSEG_TEST_SERVER_OVERRIDES"])  # {"Optim": {"learning_rate": "0.0123"}, ...}
_connect = Task.connect


def connect_with_server_values(self, mutable, name=None, *args, **kwargs):
    connected = _connect(self, mutable, name, *args, **kwargs)
    for key, value in OVERRIDES.get(name, {}).items():
        connected[key] = value  # the server returns values as strings
    return connected


Task.connect = connect_with_server_values
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
