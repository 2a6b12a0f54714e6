"""Deliberate bugs the test suite must catch:  python -m tests.mutations [--only NAME ...] [--list]

Each mutation replaces exact snippets of the source in a temporary COPY of the repository (the working tree is
never edited), runs the tests named for it there, and counts as caught when one of them fails. A snippet that is
no longer in its file is reported as a STALE mutation (the code moved on: update the list), so the list cannot
rot silently. Before any mutation, the named tests must pass on the unmutated copy.

Prints a table (mutation | caught by | result) and exits non-zero if any mutation survives, is stale, or errs.
Run it before a release; its last table is in the README.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MATHS = "tests/test_training_maths.py"


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids


SCHEDULER_PER_MICRO_BATCH = Edit(
    "vocseg/engine.py", '        window["aux"] = parts.get("loss_aux")\n',
    '        window["aux"] = parts.get("loss_aux")\n        if not accelerator.sync_gradients:\n'
    '            run.scheduler.step()\n')
DECAY_EVERYTHING = Edit("vocseg/optim.py", '"weight_decay": weight_decay if decay == "decay" else 0.0}',
                        '"weight_decay": weight_decay}')
NO_HEAD_MULTIPLIER = Edit("vocseg/optim.py", '"lr": learning_rate * (head_lr_mult if part == "head" else 1.0),',
                          '"lr": learning_rate,')
SCHEDULE_TESTS = (f"{MATHS}::test_every_group_warms_up_linearly_then_decays_to_min_learning_rate",
                  f"{MATHS}::test_engine_steps_the_schedule_once_per_optimiser_step_in_every_group")
DECAY_TESTS = (f"{MATHS}::test_weight_decay_goes_to_weights_not_to_norms_or_biases",
               f"{MATHS}::test_engine_applies_weight_decay_and_head_lr_to_the_right_tensors")
ACCUMULATION_TESTS = (f"{MATHS}::test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8",
                      "tests/test_engine.py::test_gradient_accumulation_run")
ALIGNMENT_TEST = ("tests/test_transforms.py::test_train_augment_keeps_alignment_and_labels",)
CLUSTER = "tests/test_cluster_resume.py"
FAILURES = "tests/test_failures.py"
RUN_FOLDER = "tests/test_run_folder.py"

MUTATIONS = (
    Mutation("scheduler stepped on every micro-batch", (SCHEDULER_PER_MICRO_BATCH,),
             (f"{MATHS}::test_engine_steps_the_schedule_once_per_optimiser_step_in_every_group", *ACCUMULATION_TESTS)),
    Mutation("weight decay on every parameter", (DECAY_EVERYTHING,), DECAY_TESTS),
    Mutation("head lr multiplier dropped", (NO_HEAD_MULTIPLIER,), (*SCHEDULE_TESTS, *DECAY_TESTS)),
    Mutation("the three at once", (SCHEDULER_PER_MICRO_BATCH, DECAY_EVERYTHING, NO_HEAD_MULTIPLIER),
             (*SCHEDULE_TESTS, *DECAY_TESTS, *ACCUMULATION_TESTS)),
    Mutation("poly end not per group (head ends at mult x min_lr)",
             (Edit("vocseg/optim.py", "poly_warmup_lr(step, base_lr, cfg.min_learning_rate,",
                   "poly_warmup_lr(step, base_lr, cfg.min_learning_rate * base_lr / cfg.learning_rate,"),),
             SCHEDULE_TESTS),
    Mutation("loss ignore_index dropped",
             (Edit("vocseg/losses.py", "labels, ignore_index=IGNORE_INDEX, reduction=\"sum\")",
                   "labels.clamp(max=20), reduction=\"sum\")"),),
             (f"{MATHS}::test_logged_loss_is_the_cross_entropy_over_labelled_pixels",)),
    Mutation("loss averaged over all pixels, void included",
             (Edit("vocseg/losses.py", 'count = labels.numel() if average == "all" else (labels != IGNORE_INDEX).sum()',
                   "count = labels.numel() if True else (labels != IGNORE_INDEX).sum()"),),
             (f"{MATHS}::test_logged_loss_is_the_cross_entropy_over_labelled_pixels",)),
    Mutation("every rank scores every evaluation sample",
             (Edit("vocseg/sampling.py", "    return batches[rank::world_size]", "    return batches"),),
             ("tests/test_distributed_eval.py::test_two_processes_score_every_sample_exactly_once",)),
    Mutation("evaluation batches mix image sizes (padding changes predictions)",
             (Edit("vocseg/sampling.py", "by_size.setdefault(tuple(size), []).append(index)",
                   "by_size.setdefault((0, 0), []).append(index)"),),
             (f"{FAILURES}::test_evaluation_batch_3_gives_the_same_confusion_matrix_as_batch_1",)),
    Mutation("mask interpolation INTER_NEAREST",
             (Edit("vocseg/data/transforms.py", "mask_interpolation=cv2.INTER_NEAREST_EXACT, fill_mask=IGNORE_INDEX,",
                   "mask_interpolation=cv2.INTER_NEAREST, fill_mask=IGNORE_INDEX,"),),
             ALIGNMENT_TEST),
    Mutation("padding mask with 0 instead of 255",
             (Edit("vocseg/data/transforms.py", "else 0, fill_mask=IGNORE_INDEX))", "else 0, fill_mask=0))"),),
             ALIGNMENT_TEST),
    Mutation("resume restarts the epoch instead of continuing at its sample",
             (Edit("vocseg/engine.py", "run.sampler.set_position(state.epoch, state.samples_in_epoch)",
                   "run.sampler.set_position(state.epoch, 0)"),),
             ("tests/test_engine.py::test_resume_after_crash_and_after_sigterm_equals_uninterrupted_run",)),
    Mutation("resume on fewer processes keeps the accumulation (global batch shrinks)",
             (Edit("vocseg/engine.py", "    if recorded % per_step == 0:\n", "    if False:\n"),),
             (f"{CLUSTER}::test_stopped_on_two_processes_resumed_on_one",)),
    Mutation("BatchNorm statistics not shared before a DDP evaluation",
             (Edit("vocseg/engine.py", "    share_batchnorm_statistics(run.model, accelerator)\n", ""),),
             (f"{CLUSTER}::test_two_process_deeplab_logs_the_miou_of_its_export",)),
    Mutation("weights saved without a finiteness check",
             (Edit("vocseg/engine.py", "    if not bool(finite):\n", "    if False:\n"),),
             (f"{FAILURES}::test_divergence_stops_with_the_step_named_and_saves_no_nonfinite_weights",)),
    Mutation("evaluation before the step's checkpoint",
             (Edit("vocseg/engine.py", "    if will_save:\n        save(run)\n    if will_eval:\n",
                   "    if will_eval:\n"),
              Edit("vocseg/engine.py", "            save(run)\n            return True\n    return False\n",
                   "            save(run)\n            return True\n    if will_save:\n        save(run)\n"
                   "    return False\n")),
             (f"{FAILURES}::test_huge_val_image_fails_evaluation_after_the_checkpoint_and_max_eval_size_fixes_it",)),
    Mutation("a fresh run takes over a folder that holds a run",
             (Edit("vocseg/run_folder.py",
                   "            else:\n                raise _folder_taken(output_dir, contents)\n",
                   "            else:\n                pass\n"),
              Edit("vocseg/run_folder.py", "        raise _folder_taken(output_dir, contents)\n\n",
                   "        pass\n\n")),
             (f"{RUN_FOLDER}::test_a_second_run_on_a_finished_folder_is_refused_and_changes_nothing",)),
    Mutation("later checkpoints deleted when resuming from an earlier one",
             (Edit("vocseg/checkpoint.py", "        path.rename(target / path.name)\n",
                   "        shutil.rmtree(path)\n"),),
             ("tests/test_engine.py::test_resuming_from_an_earlier_checkpoint_moves_the_later_ones_aside",)),
    Mutation("stop request ignored during evaluation",
             (Edit("vocseg/engine.py", "            if stop is not None and stop.requested:\n",
                   "            if False:\n"),),
             (f"{CLUSTER}::test_sigterm_to_the_launcher_during_evaluation",)),
    Mutation("a full disk seen by the main process only (the other ranks wait)",
             (Edit("vocseg/checkpoint.py", "    on_main_then_everywhere(accelerator, prepare)",
                   "    if accelerator.is_main_process:\n        prepare()\n    accelerator.wait_for_everyone()"),),
             ("tests/test_distributed_eval.py::test_a_full_disk_stops_every_rank_with_the_main_process_error",)),
    Mutation("accelerate's restored micro-batch counter kept on resume",
             (Edit("vocseg/engine.py", "    accelerator.step = 0\n", ""),),
             ("tests/test_engine.py::test_resume_with_another_accumulation_starts_each_window_on_a_step_boundary",)),
)


def copy_repository(destination: Path) -> None:
    """Tracked and untracked-but-not-ignored files of the working tree: what the suite would see."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / relative)


def stale_edits(mutation: Mutation, root: Path) -> list[str]:
    problems = []
    for edit in mutation.edits:
        path = root / edit.file
        count = path.read_text().count(edit.old) if path.is_file() else 0
        if count != 1:
            problems.append(f"{edit.file}: snippet found {count} times: {edit.old.strip()[:60]!r}")
    return problems


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, list[str], str]:
    """(pytest exit code, failed/errored node ids, output tail) for `tests` run in the copy at `root`."""
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests],
                            cwd=root, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
    return result.returncode, failed, (result.stdout + result.stderr)[-3000:]


def apply(mutation: Mutation, root: Path) -> dict[Path, str]:
    originals = {}
    for edit in mutation.edits:
        path = root / edit.file
        originals.setdefault(path, path.read_text())
        path.write_text(path.read_text().replace(edit.old, edit.new))
    return originals


def check(mutation: Mutation, root: Path) -> tuple[str, str]:
    """(caught by, result) for one mutation, applied to the copy at `root` and undone afterwards."""
    stale = stale_edits(mutation, root)
    if stale:
        return "-", "STALE MUTATION: " + "; ".join(stale)
    originals = apply(mutation, root)
    try:
        code, failed, tail = run_tests(root, mutation.tests)
    finally:
        for path, text in originals.items():
            path.write_text(text)
    if code == 0:
        return "-", "SURVIVED"
    if code == 1 and failed:
        return failed[0].split("::")[-1], "caught"
    return "-", f"ERROR (pytest exit {code}): {tail.strip().splitlines()[-1] if tail.strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only mutations whose name contains NAME")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests unmutated first")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(word in m.name for word in args.only)]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}\n  " + "\n  ".join(mutation.tests))
        return 0
    with tempfile.TemporaryDirectory(prefix="vocseg-mutations-") as tmp:
        root = Path(tmp)
        copy_repository(root)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
            start = time.perf_counter()
            code, failed, tail = run_tests(root, tests)
            if code != 0:
                print(f"the named tests fail WITHOUT any mutation ({failed or tail}): fix them first")
                return 2
            print(f"baseline: {len(tests)} named tests pass unmutated ({time.perf_counter() - start:.0f} s)")
        rows = []
        for mutation in chosen:
            start = time.perf_counter()
            caught_by, result = check(mutation, root)
            rows.append((mutation.name, caught_by, result))
            print(f"  {mutation.name}: {result} ({caught_by}, {time.perf_counter() - start:.0f} s)", flush=True)
    widths = [max(len(row[i]) for row in rows + [("mutation", "caught by", "result")]) for i in range(3)]
    print("\n| " + " | ".join(h.ljust(w) for h, w in zip(("mutation", "caught by", "result"), widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
    bad = [name for name, _, result in rows if result != "caught"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutations caught"
          + (f"; NOT caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
