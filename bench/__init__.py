"""The benchmark: `python -m bench --preset NAME`. Our trainer and the plain transformers (+ peft,
+ bitsandbytes) loop side by side in one run, on the same shape, weights, data, batch, optimizer and
precision, rows interleaved so that a busy machine slows both alike. See bench/__main__.py."""
