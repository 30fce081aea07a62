"""``broadface train CONFIG [key=value ...]``: train a backbone with a margin loss and (optionally) BroadFace."""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train a face-recognition / metric-learning backbone from a YAML config (see configs/ and
docs/training.md). Any config key can be overridden as section.key=value, e.g.
  broadface train configs/omniglot_tinycnn.yaml optim.lr=0.05 head.queue_size=0 train.steps=200
Values are parsed as YAML (numbers, true/false, null, [lists]). Outputs go to train.output:
checkpoints/step_N.pt, final.pt, train.csv, eval.csv, tensorboard/, summary.json.
A run owns train.output: a second run into it, or a fresh run into a folder holding another
run's results, is refused (--overwrite replaces them). Resume an interrupted run exactly with
train.resume=auto (or a checkpoint path); keys that change what the run is are refused on
resume, and keys such as train.steps or optim.lr may change when named in
train.resume_allow=[train.steps,optim.lr]. SIGTERM / Ctrl-C stop after the current step with
a checkpoint. Warm-start from another run's weights with train.init=PATH.
Several GPUs / machines (train.batch_size is per process; see docs/distributed.md):
  torchrun --nproc_per_node 8 -m broadface train CONFIG [KEY=VALUE ...]"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model (margin loss + BroadFace queue)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file, e.g. configs/omniglot_tinycnn.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=0.1")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--no-progress", action="store_true",
                   help="print one plain line per log interval / evaluation instead of a progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier run in train.output (same as train.overwrite=true)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from broadface.cli.main import CLIError
    from broadface.train.config import load_config

    overrides = [*args.overrides, *(["train.overwrite=true"] if args.overwrite else [])]
    cfg = load_config(args.config, overrides).validate()
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from broadface.train.logs import format_record
    from broadface.train.trainer import Trainer, TrainingDiverged

    def print_line(kind: str, record: dict) -> None:
        print(f"{kind} step {record['step']}: {format_record(record)}", flush=True)

    trainer = None
    try:
        trainer = Trainer(cfg, progress=not args.no_progress)
        main = trainer.ctx.is_main  # under torchrun only rank 0 prints
        if args.no_progress and main:
            trainer.callbacks.append(print_line)
        if main and trainer.step:
            changes = "; ".join(trainer.checkpoints.changes)
            print(f"resumed from step {trainer.step} ({trainer.checkpoints.last})"
                  + (f" with {changes}" if changes else ""), flush=True)
        result = trainer.fit()
    except TrainingDiverged as err:
        raise CLIError(str(err)) from None
    finally:
        if trainer is not None:
            trainer.close()  # also ends the process group (torchrun)
    if not main:
        return 0
    if result.summary.get("signal"):
        import signal

        print(f"stopped by {result.summary['signal']} after step {result.summary['step']}: checkpoint "
              f"{result.summary['checkpoint']}; continue with train.resume=auto", file=sys.stderr)
        return 128 + int(signal.Signals[result.summary["signal"]])
    last = result.history[-1] if result.history else {}
    parts = [f"step {result.summary['step']}"]
    if last:
        parts.append(f"batch loss {last['batch_loss']:.4f}")
        if last.get("queue_fill"):
            parts.append(f"union loss {last['union_loss']:.4f}")
    if result.evals:
        parts += [f"{k} {v:.4f}" for k, v in result.evals[-1].items()
                  if k.startswith("val_") or k.endswith("_accuracy")]
    print("done: " + ", ".join(parts))
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
    return 0
