"""Float8 training (torchao), as mechanics the trainer's float8 converter (trainer/converters/float8.py)
uses: which linear layers convert and how (conversion.py), float8 tensor parallel styles (tp.py), the
hardware it needs (hardware.py), its settings (config.py). Nothing here imports the trainer."""
