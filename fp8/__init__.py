"""Float8 training (torchao): which linear layers convert and how (conversion.py), float8 tensor
parallel styles (tp.py), the hardware it needs (hardware.py), and the converter that the trainer, the
plan and the dry run ask (converter.py)."""
