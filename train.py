"""Entry point: `torchrun [--nproc_per_node N] train.py --config configs/X.yaml [dotted.key=value ...]`.

`python train.py ...` runs as a single process. Mistakes in the config, data or checkpoint paths are
reported in one line on stderr with exit code 2, before any training work starts. SIGTERM, SIGUSR1 or a
first Ctrl-C (SIGINT) saves a checkpoint after the current step and exits with code 75 (see
trainer/preemption.py); a second Ctrl-C stops at once with code 130, keeping the last complete checkpoint. A run whose
loss stays non-finite for training.max_bad_steps steps stops with exit code 3, its last good checkpoint
kept. A run whose rank hangs (no step completes in fault.hang_timeout_s) exits with code 124 after
writing every rank's stacks (trainer/fault/watchdog.py). `--check` validates the config, data and checkpoints in one process and trains nothing: launchers
run it before starting many processes, so a mistake is reported once and not by every rank.

Only light modules are imported at the top: a config mistake is reported before torch is loaded.
"""

import argparse
import gc
import os
import signal
import sys
from pathlib import Path

from trainer.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, Parser, at_least
from trainer.config import load_config
from trainer.errors import ConfigError, TrainingDiverged, UserError

EXIT_DIVERGED = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(prog="python train.py", description="Train a decoder language model (see configs/ and README.md).")
    parser.add_argument("--config", help="YAML file (see configs/); required but with --calibrate")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, sizes and memory estimate, then exit")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, data and checkpoints for --world-size ranks, train nothing, exit 0 if all is well")
    parser.add_argument("--world-size", type=at_least(1), default=None,
                        help="with --dry-run, --check or --plan: the number of ranks to plan for")
    parser.add_argument("--plan", action="store_true",
                        help="rank the layouts (parallel sizes, activation checkpointing, batch split, float8) by predicted "
                             "speed within the memory, print the best and the overrides that run it, then exit")
    parser.add_argument("--device", default=None,
                        help="with --plan: h100-80gb, h200, a100-80gb, l40s, cpu (measures this machine now) or a "
                             "profile file from --calibrate (default: this machine's GPU by name, else cpu)")
    parser.add_argument("--nodes", type=at_least(1), default=1, help="with --plan: nodes the ranks are spread over")
    parser.add_argument("--top", type=at_least(1), default=5, help="with --plan: how many layouts to print")
    parser.add_argument("--memory-margin", type=float, default=0.8,
                        help="with --plan: the share of a device's memory a layout may fill by the estimate (default 0.8)")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this machine (matmul rates, memory bandwidth, collectives, the parallel wrappers' own costs) "
                             "into --profile-out, then exit")
    parser.add_argument("--profile-out", default=None, help="with --calibrate: the profile file to write (JSON)")
    parser.add_argument("--nproc-per-node", type=at_least(1), default=None,
                        help="with --check: how many of the ranks run on this host (default: all of them)")
    parser.add_argument("--for-another-machine", action="store_true",
                        help="with --check: what this machine lacks for the plan is a note, not an error")
    parser.add_argument("--print-output-dir", action="store_true",
                        help="print the run's resolved job.output_dir and exit (for launchers)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. training.steps=50")
    # Intermixed: overrides may come before and after the flags (--check after the overrides is common).
    args = parser.parse_intermixed_args(argv)
    if args.world_size is not None:
        if not (args.dry_run or args.check or args.plan):
            raise ConfigError("--world-size plans for that many ranks with --dry-run, --check or --plan; to train on N "
                              "ranks, launch with torchrun --nproc_per_node N")
    if args.plan and (args.dry_run or args.check):
        raise ConfigError("--plan is separate from --dry-run and --check: give one of them")
    if not args.plan and (args.device is not None or args.nodes != 1 or args.top != 5 or args.memory_margin != 0.8):
        raise ConfigError("--device, --nodes, --top and --memory-margin go with --plan")
    if not 0 < args.memory_margin <= 1:
        raise ConfigError(f"--memory-margin {args.memory_margin} must be in (0, 1]: the share of memory a layout may fill")
    if args.calibrate != (args.profile_out is not None):
        raise ConfigError("--calibrate writes the profile to --profile-out FILE: give both")
    if args.config is None and not args.calibrate:
        raise ConfigError("the following arguments are required: --config (see python train.py --help)")
    if (args.nproc_per_node is not None or args.for_another_machine) and not args.check:
        raise ConfigError("--nproc-per-node and --for-another-machine go with --check")
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


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _mark_failed(cfg, what: str, error: Exception) -> None:
    """output_dir/FAILED: the run failed of itself, which no restart or requeue mends (launch/slurm.sbatch
    reads it; a lost rank or a hang leaves none and counts as transient)."""
    from trainer.fault import FAILED_MARKER

    out = Path(cfg.job.output_dir)
    if not out.is_dir():  # bad input creates no output directory; launchers run --check first, which finds it
        return
    (out / FAILED_MARKER).write_text(f"{what}: {str(error).splitlines()[0][:300]}\n")


def main(argv: list[str]) -> int:
    from parallel.library_patches import quiet_import_noise

    quiet_import_noise()  # before torchao and friends are imported (parallel/library_patches.py says what)
    try:
        args = parse_args(argv)
        if args.calibrate:
            from trainer.planner.command import calibrate_command

            print(calibrate_command(args.profile_out))
            return 0
        cfg = load_config(args.config, args.overrides)
        if cfg.parallel.auto and not (args.plan or args.print_output_dir):
            from parallel.distributed import launched_world_size
            from trainer.planner.command import auto_choice, auto_profile
            from trainer.planner.search import search

            world = args.world_size or launched_world_size()  # torchrun's, or --world-size with --dry-run / --check
            nodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            profile = auto_profile(cfg.parallel)
            chosen, line = auto_choice(search(cfg, world, profile, nodes=nodes), profile, world)
            cfg = load_config(args.config, [*args.overrides, *chosen])
            if os.environ.get("RANK", "0") == "0":
                print(line, flush=True)
        if cfg.fault.replica_groups > 1:  # each replica group's checkpoints and logs apart
            cfg.job.output_dir = f"{cfg.job.output_dir}/replica-{cfg.fault.replica_id}"
        if args.print_output_dir:
            print(cfg.job.output_dir)
            return 0
        if args.plan:
            import time

            from trainer.planner.command import plan_command, resolve_profile
            from trainer.planner.search import search

            profile = resolve_profile(args.device)
            start = time.perf_counter()
            result = search(cfg, args.world_size or 1, profile, nodes=args.nodes, margin=args.memory_margin)
            print(plan_command(result, profile, args, cfg.data.num_streams, time.perf_counter() - start))
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
                from trainer.machine_fit import this_machine

                print(check_run(plan, this_machine(), args.nproc_per_node, elsewhere=args.for_another_machine))
            return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped by Ctrl-C before training started", file=sys.stderr)
        return EXIT_INTERRUPTED

    from parallel.distributed import init_runtime, shutdown
    from trainer.preemption import EXIT_PREEMPTED, MARKER, Preempted, stop_at_once

    if cfg.fault.hang_timeout_s > 0 and _has_cuda():
        # NCCL's flight recorder keeps each rank's last collectives for the watchdog's dump (set before the
        # process group exists; a user's own setting wins). torch 2.13 reads TORCH_FR_BUFFER_SIZE, earlier
        # ones TORCH_NCCL_TRACE_BUFFER_SIZE.
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", os.environ["TORCH_FR_BUFFER_SIZE"])
    runtime = init_runtime()
    # Outside the training loop (setting up, and stopping after a save) a Ctrl-C stops at once; the
    # loop installs its own handler (first Ctrl-C: save, then stop) and gives this one back when it ends.
    signal.signal(signal.SIGINT, lambda signum, frame: stop_at_once(runtime.is_main))
    try:
        _run(cfg, runtime)
    except UserError as e:
        if runtime.is_main:
            print(f"error: {e}", file=sys.stderr)
        _mark_failed(cfg, "a config, data or checkpoint error", e)  # any rank may be the one that found it
        return EXIT_USER_ERROR
    except TrainingDiverged as e:
        if runtime.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        _mark_failed(cfg, "the training diverged", e)
        return EXIT_DIVERGED
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
