"""Launchers: `python -m launch local` (torchrun on this machine) and launch/slurm.sbatch (Slurm, one
node or many, preemption and requeue). Both run `train.py --check` first, so a bad config, override or
process count is reported once, in the trainer's own words, before any rank starts."""
