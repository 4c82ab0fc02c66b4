"""Publish a checkpoint: a self-contained Hugging Face model folder (`export`) and its upload (`push`).

The export is what a hub repo should hold: the plain `transformers` model (gains already
folded in the checkpoint's `model/`), the tokenizer files beside it, a generation config,
a model card with the training config, data manifest summary, optimizer and rotation
summary, the checkpoint's `rotation/` metrics and figures, and the resolved training config.

The CLI imports this module to build its parser, so torch, transformers and huggingface_hub
are imported inside the functions that use them: `pretrain --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, config_from_dict
from pretrain.errors import UserError

TRAINING_CONFIG = "training_config.yaml"
DATA_MANIFEST = "data_manifest.json"
# Sampling defaults of the hub widget and `model.generate()`, the same as `pretrain generate`.
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 50, "max_new_tokens": 64}


# ----------------------------------------------------------------------------- export


def export_checkpoint(checkpoint: str | Path, out: str | Path, license: str | None = None) -> Path:
    """Write the hub folder of a checkpoint (or a run's latest) to `out`, atomically; return `out`."""
    from pretrain.generate import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new export folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        _write_export(ckpt, tmp, license)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_export(ckpt: Path, out: Path, license: str | None) -> None:
    import torch
    from transformers import AutoConfig, GenerationConfig

    from pretrain.card import model_card
    from pretrain.data.shards import read_index

    cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    # Model and tokenizer files side by side, the layout `from_pretrained(repo)` expects for both.
    for source in (ckpt / "model", ckpt / "tokenizer"):
        for path in sorted(source.iterdir()):
            shutil.copy2(path, out / path.name)
    shutil.copytree(ckpt / "rotation", out / "rotation")
    shutil.copy2(ckpt / "config.yaml", out / TRAINING_CONFIG)
    model_config = AutoConfig.from_pretrained(ckpt / "model")
    GenerationConfig(bos_token_id=model_config.bos_token_id, eos_token_id=model_config.eos_token_id,
                     pad_token_id=model_config.pad_token_id, **SAMPLING).save_pretrained(out)
    index = read_index(Path(cfg.data.dir))
    if index is not None:
        (out / DATA_MANIFEST).write_text(json.dumps(index["source"], indent=1) + "\n")
    trainer = torch.load(ckpt / "state" / "trainer.pt", weights_only=True)
    card = model_card(cfg, int(trainer["step"]), int(trainer["tokens_seen"]), trainer.get("val_loss"),
                      ckpt / "rotation", license)
    card += "\n" + data_section(cfg, index)
    (out / "README.md").write_text(card + "\n" + figures_section(out / "rotation", card))


def data_section(cfg: Config, index: dict[str, Any] | None) -> str:
    """Model-card section summarising the prepared data's index (source manifest, tokens, tokenizer)."""
    if index is None:
        return (f"## Data\n\nSource `{cfg.data.source}`; its prepared index ({cfg.data.dir}/index.json) was not "
                "available at export time.\n")
    source = index["source"]
    details = ", ".join(f"{k} `{v}`" for k, v in source.items() if k != "files" and not isinstance(v, (list, dict)))
    rows = [f"| source | {details} |"]
    files = source.get("files")
    if files:
        size = sum(f["bytes"] for f in files)
        rows.append(f"| files | {len(files):,} files, {size:,} bytes; sha256 of each in `{DATA_MANIFEST}` |")
    splits = index["splits"]
    rows += [f"| tokens | {splits['train']['num_tokens']:,} train, {splits['val']['num_tokens']:,} val "
             f"({index['documents']:,} documents) |",
             f"| tokenizer | {index['tokenizer'].get('name', cfg.data.tokenizer)}, {index['vocab_size']:,} tokens, "
             f"sha256 `{index['tokenizer']['sha256'][:16]}…` |",
             f"| fingerprint | `{index['fingerprint']}` |"]
    return "\n".join(["## Data", "", "| | |", "|---|---|", *rows, ""])


def figures_section(rotation_dir: Path, card: str) -> str:
    """Model-card section showing the rotation figures in `rotation/` that `card` does not show yet."""
    images = [p for p in sorted(rotation_dir.glob("*.png")) if f"(rotation/{p.name})" not in card]
    if not images:
        return ""
    return "\n".join(["## More rotation figures", "", *(f"![{p.stem}](rotation/{p.name})" for p in images), ""])


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(POSIX path relative to `folder`, size in bytes) of every file, sorted."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def format_listing(files: list[tuple[str, int]]) -> str:
    total = sum(size for _, size in files)
    return "\n".join([*(f"{size:>14,}  {name}" for name, size in files),
                      f"{total:>14,}  total, {len(files)} files"])


# ----------------------------------------------------------------------------- push


def push_checkpoint(checkpoint: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
                    dry_run: bool = False, license: str | None = None) -> list[tuple[str, int]]:
    """Export to a temp folder and upload it to `repo_id`; return the files sent.

    The token is huggingface_hub's own: $HF_TOKEN, else the one `hf auth login` stored.

    `dry_run` only exports and lists; it needs no token and makes no network call.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from pretrain.generate import resolve_checkpoint

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"--repo-id {repo_id!r} is not a valid hub repo id ({exc}); use ORG/NAME") from None
    token = get_token()
    if not dry_run and not token:
        raise UserError("no hub token: run `hf auth login` or set HF_TOKEN to a token with write access "
                        "(huggingface.co/settings/tokens), or use --dry-run")
    ckpt = resolve_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="pretrain-push-") as tmp:
        folder = export_checkpoint(ckpt, Path(tmp) / "export", license)
        files = list_files(folder)
        if dry_run:
            return files
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                              commit_message=f"Upload {ckpt.name} from rotational-pretrain")
        except Exception as exc:  # only hub calls in here: auth, permission, network, offline mode
            reason = str(exc).partition("\n")[0]
            raise UserError(f"upload to {repo_id} failed ({type(exc).__name__}: {reason})") from None
    return files


# ----------------------------------------------------------------------------- CLI


def export_command(args: argparse.Namespace) -> None:
    out = export_checkpoint(args.checkpoint, args.out, args.license)
    print(format_listing(list_files(out)))
    print(f"exported to {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")


def push_command(args: argparse.Namespace) -> None:
    files = push_checkpoint(args.checkpoint, args.repo_id, args.private, args.revision, args.dry_run, args.license)
    target = f"{args.repo_id}" + (f"@{args.revision}" if args.revision else "")
    if args.dry_run:
        print(f"dry run: would upload to {target} ({'private' if args.private else 'public'}):")
        print(format_listing(files))
    else:
        print(f"uploaded {len(files)} files to https://huggingface.co/{args.repo_id}"
              + (f"/tree/{args.revision}" if args.revision else ""))


LICENSE_HELP = "license id for the model card metadata (e.g. apache-2.0, mit); omitted when not given"
CHECKPOINT_HELP = "checkpoint folder (runs/X/checkpoints/step_N), or a run folder (its latest checkpoint)"


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a self-contained Hugging Face model folder from a checkpoint",
                       description="Write OUT: the plain transformers model (gains folded), tokenizer, generation "
                                   "config, model card (config, data, optimizer, rotation summary), rotation/ "
                                   "metrics and the training config. Loads with AutoModelForCausalLM offline.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    p.add_argument("out", metavar="OUT", help="new (or empty) folder to write")
    p.add_argument("--license", metavar="ID", help=LICENSE_HELP)
    p.set_defaults(func=export_command)


def add_push_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="export a checkpoint and upload it to the Hugging Face hub",
                       description="Export CHECKPOINT to a temp folder and upload it with huggingface_hub. The "
                                   "token is the one `hf auth login` stored, or HF_TOKEN when set.",
                       epilog="Example: HF_TOKEN=hf_... pretrain push runs/tiny-cpu --repo-id me/tiny --private")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=CHECKPOINT_HELP)
    p.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--license", metavar="ID", help=LICENSE_HELP)
    p.add_argument("--revision", metavar="BRANCH", help="branch to upload to (created if missing; default main)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the files and sizes that would be uploaded; no token, no network")
    p.set_defaults(func=push_command)
