"""One-step GPU timing of a guidance step (``rfds-benchmark-step``); no model downloads, random weights of
real sizes.  Not to be confused with :mod:`threestudio_rfds.bench`, the text-to-3D suite runner."""
