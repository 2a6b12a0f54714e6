"""Run train.py as clearml-agent runs a clone whose hyperparameters were edited in the UI (real Task.connect,
see clearml_clone.py).

Every rank runs this file; only the main process creates the task and calls Task.connect, so the other ranks
can only learn the edited values through vocseg's broadcast.
"""

import json
import os
import runpy
import sys

from clearml_clone import replay_edited_clone  # this file's folder is sys.path[0]

replay_edited_clone(json.loads(os.environ["VOCSEG_TEST_SERVER_OVERRIDES"]))  # {"Optim": {"learning_rate": "0.0123"}}
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
