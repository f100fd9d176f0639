"""Entry point: `torchrun [--nproc_per_node N] train.py --config configs/X.yaml [dotted.key=value ...]`.

`python train.py ...` runs as a single process. Mistakes in the config, data or checkpoint paths are
reported in one line on stderr with exit code 2, before any training work starts. SIGTERM or SIGUSR1
saves a checkpoint after the current step and exits with code 75 (see trainer/preemption.py).
"""

import argparse
import gc
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.data import DataError
from trainer.weights.errors import CheckpointError

USER_ERRORS = (ConfigError, DataError, CheckpointError)
EXIT_USER_ERROR = 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a Llama-family decoder.")
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, sizes and memory estimate, then exit")
    parser.add_argument("--world-size", type=int, default=None, help="with --dry-run: the number of ranks to plan for")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. training.steps=50")
    return parser.parse_args(argv)


def _run(cfg, runtime) -> None:
    # The trainer lives only inside this call: its meshes, DTensors and FSDP state are freed before the
    # process groups are destroyed. Gloo threads still holding them at interpreter exit can abort the
    # process after a successful run.
    from trainer.trainer import Trainer

    trainer = Trainer(cfg, runtime)
    if cfg.checkpoint.create_seed:
        trainer.create_seed_checkpoint()
    else:
        trainer.train()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from trainer.distributed import init_runtime, launched_world_size, shutdown

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from trainer.dry_run import dry_run

            print(dry_run(cfg, args.world_size or launched_world_size()))
            return 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR

    from trainer.preemption import EXIT_PREEMPTED, MARKER, Preempted

    runtime = init_runtime()
    try:
        _run(cfg, runtime)
    except USER_ERRORS as e:
        if runtime.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Preempted as e:
        if runtime.is_main:
            (Path(cfg.job.output_dir) / MARKER).write_text(f"step {e.step}\n")
            print(f"stopping: {e}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    finally:
        gc.collect()
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
