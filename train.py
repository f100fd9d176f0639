"""Entry point: `torchrun [--nproc_per_node N] train.py --config configs/X.yaml [dotted.key=value ...]`.

`python train.py ...` runs as a single process. Mistakes in the config, data or checkpoint paths are
reported in one line on stderr with exit code 2, before any training work starts. SIGTERM, SIGUSR1 or a
first Ctrl-C (SIGINT) saves a checkpoint after the current step and exits with code 75 (see
trainer/preemption.py); a second Ctrl-C stops at once with code 130, keeping the last complete checkpoint. A run whose
loss stays non-finite for training.max_bad_steps steps stops with exit code 3, its last good checkpoint
kept. `--check` validates the config, data and checkpoints in one process and trains nothing: launchers
run it before starting many processes, so a mistake is reported once and not by every rank.

Only light modules are imported at the top: a config mistake is reported before torch is loaded.
"""

import argparse
import gc
import sys
from pathlib import Path

from trainer.config import load_config
from trainer.errors import ConfigError, TrainingDiverged, UserError

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # a second Ctrl-C, or one before training started: 128 + SIGINT, as shells report it
_STOPPED = "stopped at once by Ctrl-C {when}: nothing more was saved; the last complete checkpoint stays"


class _Parser(argparse.ArgumentParser):
    """argparse's errors as our one `error:` line (exit 2), without the usage block."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see python train.py --help)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(description="Train a Llama-family decoder.")
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, sizes and memory estimate, then exit")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, data and checkpoints for --world-size ranks, train nothing, exit 0 if all is well")
    parser.add_argument("--world-size", type=int, default=None, help="with --dry-run or --check: the number of ranks to plan for")
    parser.add_argument("--print-output-dir", action="store_true",
                        help="print the run's resolved job.output_dir and exit (for launchers)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. training.steps=50")
    # Intermixed: overrides may come before and after the flags (--check after the overrides is common).
    args = parser.parse_intermixed_args(argv)
    if args.world_size is not None:
        if not (args.dry_run or args.check):
            raise ConfigError("--world-size plans for that many ranks with --dry-run or --check; to train on N ranks, "
                              "launch with torchrun --nproc_per_node N")
        if args.world_size < 1:
            raise ConfigError(f"--world-size {args.world_size} must be at least 1")
    if args.dry_run and args.check:
        raise ConfigError("--dry-run and --check are separate: give one of them")
    return args


def _run(cfg, runtime) -> None:
    # The trainer lives only inside this call: its meshes, DTensors and FSDP state are freed before the
    # process groups are destroyed. Gloo threads still holding them at interpreter exit can abort the
    # process after a successful run.
    from trainer.plan import make_plan
    from trainer.trainer import Trainer

    trainer = Trainer(make_plan(cfg, runtime.world_size), runtime)
    try:
        if cfg.checkpoint.create_seed:
            trainer.create_seed_checkpoint()
        else:
            trainer.train()
    finally:
        trainer.close()


def main(argv: list[str]) -> int:
    from parallel.library_patches import quiet_import_noise

    quiet_import_noise()  # before torchao and friends are imported (parallel/library_patches.py says what)
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        if args.print_output_dir:
            print(cfg.job.output_dir)
            return 0
        if args.dry_run or args.check:
            from parallel.distributed import launched_world_size
            from trainer.plan import make_plan

            plan = make_plan(cfg, args.world_size or launched_world_size())
            if args.dry_run:
                from trainer.dry_run import dry_run

                print(dry_run(plan))
            else:
                from trainer.check import check_run

                print(check_run(plan))
            return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(_STOPPED.format(when="before training started"), file=sys.stderr)
        return EXIT_INTERRUPTED

    from parallel.distributed import init_runtime, shutdown
    from trainer.preemption import EXIT_PREEMPTED, MARKER, Preempted

    runtime = init_runtime()
    try:
        _run(cfg, runtime)
    except UserError as e:
        if runtime.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        if runtime.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except Preempted as e:
        if runtime.is_main:
            (Path(cfg.job.output_dir) / MARKER).write_text(f"step {e.step}\n")
            print(f"stopping: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        if runtime.is_main:
            print(_STOPPED.format(when="(a first Ctrl-C during training saves the step, then stops)"), file=sys.stderr,
                  flush=True)
        return EXIT_INTERRUPTED
    finally:
        gc.collect()
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
