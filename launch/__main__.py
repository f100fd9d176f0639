"""python -m launch local [--nproc N] --config X [dotted.key=value ...]
python -m launch output-dir --config X [dotted.key=value ...]   (for scripts: the run's job.output_dir)"""

import sys

from launch.local import main
from trainer.cli import run_command

if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
