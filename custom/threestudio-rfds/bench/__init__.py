"""``rfds-bench``: run a text-to-3D prompt suite through threestudio, score the renders with CLIP,
and report (docs/tools.md).  Only the standard library, numpy, PIL and matplotlib are needed to
run and report; scoring needs transformers.  threestudio itself runs as a subprocess."""
