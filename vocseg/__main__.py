"""`python -m vocseg COMMAND ...`: the tools around training."""

import sys

COMMANDS = {
    "train": ("vocseg.cli.train", "train a model, as train.py (accelerate launch -m vocseg train ... for N processes)"),
    "evaluate": ("vocseg.cli.evaluate", "score an exported model on a split (exact mIoU, 1 or N processes)"),
    "predict": ("vocseg.cli.predict", "segment image files / folders: palette PNG masks and overlays"),
    "export": ("vocseg.cli.export", "turn a training checkpoint into the best_model/ format (and push it to the Hub)"),
    "check-data": ("vocseg.data.check", "validate VOC / SBD trees: counts, bad samples, class frequencies"),
    "compare": ("vocseg.cli.compare", "compare runs (offline sessions, task ids): differing hyperparameters, metrics"),
    "clearml-import": ("vocseg.cli.clearml_import",
                       "upload an offline ClearML session (and its best model) to the server"),
    "sweep": ("vocseg.cli.sweep",
              "ClearML hyperparameter search: clones of a run with sampled values, run by clearml-agent"),
    "make-synthetic": ("vocseg.data.synthetic",
                       "write a small synthetic VOC/SBD tree (same as python -m vocseg.data.synthetic)"),
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print("usage: python -m vocseg COMMAND [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<16} {help_text}")
        return 0 if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[sys.argv[1]][0])
    return module.main(sys.argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main())
