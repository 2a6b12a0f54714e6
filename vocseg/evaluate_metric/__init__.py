"""vocseg's mean IoU as a HuggingFace `evaluate` metric, loadable offline:

    import evaluate, vocseg.evaluate_metric
    metric = evaluate.load(vocseg.evaluate_metric.MEAN_IOU_PATH)

`evaluate.load` takes a script path, or a folder holding a script of the folder's own name; this folder is
named for the package, so the path is the script's.
"""

from pathlib import Path

MEAN_IOU_PATH = str(Path(__file__).resolve().parent / "mean_iou.py")
