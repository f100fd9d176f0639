"""Kept for imports from before the names moved to trainer/model/hf_names.py (a family's own table)."""

from trainer.model.hf_names import hf_to_ours, ours_to_hf

__all__ = ["hf_to_ours", "ours_to_hf"]
