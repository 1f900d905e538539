"""Performance benchmarks (``rfds-benchmark-step``); no model downloads, random weights of real sizes."""
