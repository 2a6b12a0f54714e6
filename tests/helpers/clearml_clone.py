"""Make this process run like clearml-agent executing a clone whose hyperparameters were edited in the UI.

Nothing of ClearML's connect path is replaced: the next `Task.init` (offline) creates a real task, the edited
values are stored on it as the UI stores them (strings), and ClearML's own testing hook
`clearml.config.remote.override_current_task_id` then makes `running_remotely()` true, as CLEARML_TASK_ID does
under the agent. From there `Task.connect` takes its remote branch: it reads the task's values and casts them
with ClearML's own rules, and vocseg converts what ClearML leaves as strings.
"""

from __future__ import annotations


def replay_edited_clone(edits: dict[str, dict[str, str]]):
    """Patch `Task.init` as described above; returns a function that undoes it (and leaves remote mode)."""
    from clearml import Task
    from clearml.config.remote import override_current_task_id

    real_init = Task.__dict__["init"]

    def init(cls, *args, **kwargs):
        task = real_init.__func__(cls, *args, **kwargs)
        for section, values in edits.items():
            for name, value in values.items():
                task.set_parameter(f"{section}/{name}", value)
        override_current_task_id(task.id)
        return task

    Task.init = classmethod(init)

    def undo() -> None:
        Task.init = real_init
        override_current_task_id(None)

    return undo
