"""One command-line contract for every entry point (train.py, trainer.generate, checkpoint_export, launch,
bench): a bad input is one `error: ...` line on stderr naming what is wrong and what to do, exit code 2,
before any work; argparse's usage block becomes a `see ... --help` hint; a Ctrl-C before any work is one
line and exit code 130.

Standard library only (and trainer.errors, which is too): launch/ imports this module without loading
the trainer, torch or the config.
"""

import argparse
import sys
from collections.abc import Callable

from trainer.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class Parser(argparse.ArgumentParser):
    """argparse, its mistakes raised as UserError (subcommands' parsers are of this class too)."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than `low` (`--nproc 0` is refused, not taken as 1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse


def integers(low: int) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of integers, each no smaller than `low` (`--seq 8192,16384`)."""
    each = at_least(low)

    def parse(text: str) -> list[int]:
        try:
            return [each(part) for part in text.split(",")]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e} (a comma-separated list, e.g. {low},{low + 1})") from None

    return parse


def run_command(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """main(argv)'s exit code; its UserError as one `error:` line (exit 2), a Ctrl-C as one line (130)."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped by Ctrl-C", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
