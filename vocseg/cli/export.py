"""`python -m vocseg export --checkpoint outputs/RUN/checkpoints/step_N --out DIR`: checkpoint -> best_model/ format.

The export is vocseg.models.export_model's: for SegFormer a transformers folder with its image processor,
loadable by `from_pretrained` and `pipeline("image-segmentation")`; for DeepLab `model.safetensors` +
`vocseg_model.json`. `--push_to_hub USER/REPO` also uploads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vocseg.inference import load_checkpoint
from vocseg.models import META_FILE, export_model
from vocseg.errors import OneLineArgumentParser


def push_to_hub(out_dir: Path, repo_id: str) -> None:
    """Upload the export folder as it is on disk, in one commit.

    Uploading the folder rather than calling `model.push_to_hub` + `processor.push_to_hub` sends exactly
    the files that were just written and tested locally, vocseg_model.json included (so `load_model`
    works on a download too), and works the same for DeepLab, which is not a transformers model.
    """
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE is set: unset it (and have network access) to push")
    api = HfApi()
    url = api.create_repo(repo_id, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=url.repo_id, folder_path=str(out_dir), repo_type="model",
                      commit_message=f"vocseg export of {out_dir.name}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m vocseg export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint folder (checkpoints/step_N)")
    parser.add_argument("--out", required=True, help="the export folder to write (replaced if it is an export)")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None, help="also upload to this Hub model repo")
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint).resolve()
    if (checkpoint / META_FILE).is_file():
        print(f"error: {checkpoint} is already an exported model ({META_FILE}); it loads as it is (evaluate / "
              "predict --model); export takes a training checkpoint folder (outputs/RUN/checkpoints/step_N)",
              file=sys.stderr)
        return 2
    try:
        model, config = load_checkpoint(checkpoint)
        out = export_model(model, args.out, extra={"source_checkpoint": str(checkpoint), "train_config": config})
    except (FileNotFoundError, FileExistsError, ValueError) as error:  # named paths; no traceback needed
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {model.name} from {checkpoint} to {out}")
    if args.push_to_hub:
        try:
            push_to_hub(out, args.push_to_hub)
        except Exception as error:  # offline, no token, no rights, ...: the local export stays valid
            print(f"error: pushing to the Hub repo {args.push_to_hub} failed (it needs network access and a "
                  f"token with write access: `hf auth login`): {type(error).__name__}: {error}", file=sys.stderr)
            return 1
        print(f"pushed {out} to https://huggingface.co/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
