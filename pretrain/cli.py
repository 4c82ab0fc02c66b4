"""`pretrain` command line: prepare, train, config, generate, metrics, study, seal, export, push."""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.errors import USER_ERROR, UserError, disk_error
from pretrain.hub import add_export_parser, add_push_parser

OVERRIDES_HELP = "dotted overrides applied after the YAML, e.g. optim.lr=3e-3 train.steps=200"


def _cmd_prepare(args: argparse.Namespace) -> None:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)  # refused before the tokenizer libraries load, as in train
    from pretrain.data import prepare_data

    out = prepare_data(cfg.data, progress=True)
    print(f"data ready in {out}")


def _cmd_train(args: argparse.Namespace) -> None:
    from pretrain.config import load_config

    # A bad recipe or override is refused before torch and transformers load (~6 s on a small CPU).
    cfg = load_config(args.config, args.overrides)
    from pretrain.generate import generate_text
    from pretrain.train import train

    result = train(cfg, resume=args.resume, stop_at=args.stop_at)
    if result.stopped_by is not None:  # every rank exits with the signal's code (rank 0 has said why)
        sys.exit(128 + result.stopped_by)
    if not result.is_main:  # rank 0 reports and samples for the whole run
        return
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    print(f"finished at step {result.step}; val loss {val}; run dir {result.run_dir}")
    if result.checkpoint is not None and result.step == cfg.train.steps and cfg.sample.tokens > 0:
        sample = generate_text(result.checkpoint, cfg.sample.prompt, cfg.sample.tokens, seed=cfg.train.seed)
        (result.run_dir / "sample.txt").write_text(sample + "\n")
        print(f"--- sample ({result.checkpoint.name}) ---\n{sample}\n---")


def _cmd_config(args: argparse.Namespace) -> None:
    from pretrain.config import load_config
    from pretrain.config_doc import commented_yaml

    print(commented_yaml(load_config(args.config, args.overrides), args.config), end="")


def _cmd_generate(args: argparse.Namespace) -> None:
    from pretrain.generate import generate_text

    print(generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))


def _cmd_seal(args: argparse.Namespace) -> None:
    from pathlib import Path

    from pretrain.checkpoint import seal_checkpoint

    seal_checkpoint(Path(args.checkpoint))
    print(f"recorded the checksums of {args.checkpoint}; `pretrain train ... --resume` verifies them from now on")


def _cmd_metrics(args: argparse.Namespace) -> None:
    from pretrain.metrics import metrics_command

    metrics_command(args.paths)


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    """The positional recipe and its dotted overrides, as every config-driven subcommand takes them."""
    parser.add_argument("config", help="YAML recipe, e.g. configs/tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def _cmd_study(args: argparse.Namespace) -> None:
    from pretrain.study import load_study
    from pretrain.study_report import write_report
    from pretrain.study_run import LOG_FILE, STOPPED, StudyRun, launch_commands, run_study

    study = load_study(args.file, args.overrides, args.out_dir)
    if args.print_commands:
        print("\n".join(launch_commands(study, args.launcher)))
        return
    ran = StudyRun([]) if args.report_only else run_study(study, args.jobs)
    failed = [o for o in ran.outcomes if o.status == "failed"]
    print(f"report: {write_report(study)}")
    if ran.stopped_by is not None and not failed:
        stopped = sum(o.status == STOPPED for o in ran.outcomes)
        print(f"study stopped by {ran.stopped_by.name}: {stopped} cell(s) checkpointed; re-run the same command "
              "to resume", file=sys.stderr, flush=True)
        sys.exit(128 + ran.stopped_by)
    if failed:
        raise UserError(f"{len(failed)} of {len(study.cells)} cells failed ({', '.join(o.name for o in failed[:3])}"
                        f"{', ...' if len(failed) > 3 else ''}); read <cell>/{LOG_FILE}, fix, and re-run to resume")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="GPT pretraining with rotational optimizers and rotation metrics, driven by YAML configs.",
        epilog="Example: pretrain prepare configs/tiny-cpu.yaml && pretrain train configs/tiny-cpu.yaml")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize a corpus into token shards (idempotent)",
                       description="Turn the corpus named in data.* into token shards plus an index and tokenizer "
                                   "in data.dir. Re-running with the same inputs does nothing.")
    _add_recipe(p)
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train a model from a YAML recipe",
                       description="Train the model the recipe describes on prepared shards, writing metrics, "
                                   "TensorBoard logs and checkpoints into train.out_dir.")
    _add_recipe(p)
    p.add_argument("--resume", metavar="auto|CKPT",
                   help="'auto' continues the newest complete checkpoint in train.out_dir (or starts fresh); "
                        "a path continues that checkpoint")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="stop after this optimizer step with a checkpoint (the schedule still spans train.steps)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("config", help="print the resolved config with every key's description",
                       description="Resolve a recipe (defaults, extends:, overrides) and print it as YAML with "
                                   "each key's meaning, unit and default as a comment; the output is a valid recipe.")
    _add_recipe(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("generate", help="sample text from a checkpoint",
                       description="Sample a continuation of PROMPT from a checkpoint's model/ and tokenizer/.")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("metrics", help="print and plot rotation metrics of one run, or compare two",
                       description="Print the per-layer rotation table of a run or checkpoint, refresh its "
                                   "figures, and compare two runs side by side when given two paths.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="run folder or checkpoint folder (one or two)")
    p.set_defaults(func=_cmd_metrics)

    p = sub.add_parser(
        "study", help="run a grid of training runs (optimizer x warmup x lr x seed) and write a report",
        description="Expand the grid of a study file into training runs (\"cells\"), run the unfinished ones\n"
                    "(finished cells are skipped, interrupted ones resume from their newest checkpoint), then\n"
                    "write report.md and figures/ into the study folder. The file format is described at the\n"
                    "top of configs/study/warmup-free-cpu.yaml.",
        epilog="Examples: pretrain study configs/study/warmup-free-cpu.yaml --jobs 2\n"
               "  pretrain study configs/study/warmup-free-gpt2-124m.yaml --print-commands > cells.txt\n"
               "  pretrain study configs/study/warmup-free-gpt2-124m.yaml --print-commands \\\n"
               "      --launcher 'bash launch/slurm/node.sh' > cells.txt   # one line per SLURM array task\n"
               "  pretrain study configs/study/warmup-free-gpt2-124m.yaml --report-only",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="study file, e.g. configs/study/warmup-free-cpu.yaml")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides for every cell, applied after the study's own, e.g. train.device=cuda")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="cells run at once, each in its own process with cores/N threads (default 1: one "
                        "after another in this process)")
    p.add_argument("--out-dir", metavar="DIR", help="study folder (default: the file's out_dir:)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true",
                      help="print one `pretrain train ... --resume auto` line per cell instead of running them")
    mode.add_argument("--report-only", action="store_true",
                      help="only (re)write report.md and figures from the cells' files")
    p.add_argument("--launcher", default="pretrain train", metavar="PREFIX",
                   help="with --print-commands: what each line starts with instead of `pretrain train`, e.g. "
                        "'bash launch/slurm/node.sh' (it must take the recipe and overrides as arguments)")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("seal", help="record the checksums of a checkpoint written before they existed",
                       description="Resume only continues checkpoints whose files match their recorded sha256. "
                                   "A checkpoint written by an older version has none: after checking that it "
                                   "is complete, this records them. Seal only checkpoints you trust.")
    p.add_argument("checkpoint", help="checkpoint folder, e.g. runs/x/checkpoints/step_000500")
    p.set_defaults(func=_cmd_seal)

    add_export_parser(sub)
    add_push_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, OSError) as exc:
        error = exc if isinstance(exc, UserError) else disk_error(exc)
        if error is None:
            raise
        if os.environ.get("RANK", "0") == "0":  # every rank of a launch meets the same error: say it once
            print(f"error: {error}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

