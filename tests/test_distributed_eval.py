"""Evaluation under 2 real CPU processes (spawned, gloo, as accelerate.debug_launcher sets them up) counts every
sample once."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import PrepareForLaunch, patch_environment

import vocseg.engine as engine
from vocseg.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from vocseg.metrics import batch_confusion_matrices
from tests.toys import toy_model

NUM_SAMPLES = 7  # odd, over 2 processes x batch 2: a padded or duplicated sample would show


def samples() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for index in range(NUM_SAMPLES):
        labels = rng.integers(0, NUM_CLASSES, size=(12, 16))
        labels[rng.random(labels.shape) < 0.1] = IGNORE_INDEX
        out.append({"id": str(index), "pixel_values": torch.from_numpy(rng.integers(0, 256, (3, 12, 16), np.uint8)),
                    "labels": torch.from_numpy(labels)})
    return out


def launch_on_two_cpu_processes(function, *args) -> None:
    """accelerate.debug_launcher, but spawned instead of forked: forking a test process whose other threads
    (tensorboard writers, tqdm monitors, ClearML) may hold a lock can deadlock the children."""
    from torch.multiprocessing import start_processes

    with tempfile.NamedTemporaryFile() as rendezvous, patch_environment(
            world_size=2, master_addr="127.0.0.1", master_port="29500",  # checked, unused: the group meets in a file
            accelerate_mixed_precision="no", accelerate_debug_rdv_file=rendezvous.name,
            accelerate_use_cpu="yes", gloo_socket_ifname="lo"):
        start_processes(PrepareForLaunch(function, debug=True), args=args, nprocs=2, start_method="spawn")


def evaluate_on_every_rank(result_file: str) -> None:
    accelerator = Accelerator(cpu=True)
    model = toy_model(torch.float32)  # seeded: the same weights on every rank
    # Batches of 2 over 2 processes: 4 batches for 7 samples, so the ranks get different amounts of work.
    matrix = engine.evaluate(model, samples(), accelerator, engine.EvalOptions(batch_size=2))
    if accelerator.is_main_process:
        torch.save(matrix, result_file)


def test_two_processes_score_every_sample_exactly_once(tmp_path):
    result_file = tmp_path / "matrix.pt"
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        launch_on_two_cpu_processes(evaluate_on_every_rank, str(result_file))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    two_processes = torch.load(result_file)

    # Independently: the toy's argmax on each sample, one matrix over the 7 samples.
    model = toy_model(torch.float32).eval()
    expected = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    labelled = 0
    with torch.no_grad():
        for sample in samples():
            pixels = (sample["pixel_values"][None].float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
                / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            prediction = model(pixels)["logits"].argmax(1)
            expected += batch_confusion_matrices(prediction, sample["labels"][None], NUM_CLASSES, IGNORE_INDEX)[0]
            labelled += int((sample["labels"] != IGNORE_INDEX).sum())
    assert int(two_processes.sum()) == labelled, "samples counted twice (or lost) across processes"
    assert torch.equal(two_processes, expected)


def checkpoint_on_a_full_disk(output_dir: str, result_prefix: str) -> None:
    import vocseg.checkpoint as checkpoint
    from vocseg.errors import DiskFull

    def no_space(folder, needed):
        raise DiskFull(f"not enough space for a checkpoint in {folder}: 100 bytes needed, 1 free")

    checkpoint._check_free_space = no_space  # only the main process checks; every rank must stop
    accelerator = Accelerator(cpu=True)
    try:
        checkpoint.save_checkpoint(accelerator, output_dir, 1, None)
        outcome = "saved"
    except DiskFull as error:
        outcome = f"DiskFull: {error}"
    Path(f"{result_prefix}.rank{accelerator.process_index}").write_text(outcome)


def test_a_full_disk_stops_every_rank_with_the_main_process_error(tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        launch_on_two_cpu_processes(checkpoint_on_a_full_disk, str(tmp_path / "run"), str(tmp_path / "outcome"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    outcomes = [(tmp_path / f"outcome.rank{rank}").read_text() for rank in (0, 1)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].startswith("DiskFull: not enough space for a checkpoint in ")
    assert "100 bytes needed" in outcomes[0]
    assert not list((tmp_path / "run").glob(".tmp-*"))
