"""rfds-2d / rfds-edit command lines for a new user (issues 20, 21): --help shows the defaults,
an error that needs only the VAE factor or the model family comes from the config files in
about a second (diffusers is not imported), --no-progress silences the libraries' bars too,
and a negative guidance scale is refused."""
import re
import subprocess
import sys

import pytest

from threestudio_rfds.tools import edit, playground


@pytest.mark.parametrize("tool, defaults", [
    (playground, [r"--steps STEPS\s+default: 800", r"--min-step-percent MIN_STEP_PERCENT\s+default: 0.02",
                  r"rfds or rfds-rev \(default: rfds\)", r"--height HEIGHT\s+default: 512", r'default: ""']),
    (edit, [r"--steps STEPS\s+default: 500", r"\(default: adam\)", r"\(default: composite\)"]),
])
def test_help_shows_the_defaults(tool, defaults):
    text = tool.parser().format_help()
    for d in defaults:
        assert re.search(d, text), d
    assert "(default: None)" not in text and "(default: False)" not in text


# Imports the tool, then runs it: only the argument check runs, so no model library is imported.
CHILD = """
import sys
from threestudio_rfds.tools import {tool} as tool
code = tool.main(sys.argv[1:])
print("EXIT", code, "DIFFUSERS", "diffusers" in sys.modules, "TRANSFORMERS", "transformers" in sys.modules)
"""


def _child(tool, argv):
    r = subprocess.run([sys.executable, "-c", CHILD.format(tool=tool), *argv], capture_output=True, text=True,
                       timeout=120)
    return r.stdout.strip().splitlines()[-1], r.stderr.strip()


@pytest.mark.parametrize("tool, extra", [
    ("playground", ["--prompt", "a cat"]),
    ("edit", ["--image", "IMAGE", "--source-prompt", "a", "--target-prompt", "b"]),
])
def test_size_and_family_errors_come_before_any_model_library(tiny_sd3_path, tiny_instaflow_path, tmp_path, tool,
                                                              extra):
    from PIL import Image

    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IMAGE" else a for a in extra]
    base = [*extra, "--out", str(tmp_path / "out")]
    name = "rfds-2d" if tool == "playground" else "rfds-edit"
    last, err = _child(tool, [*base, "--pretrained", tiny_instaflow_path, "--model", "instaflow",
                              "--height", "33", "--width", "32"])
    assert last == "EXIT 2 DIFFUSERS False TRANSFORMERS False", (last, err)
    assert err == f"{name}: error: --height/--width 33x32 must be positive multiples of the VAE factor 8 (e.g. 32x32)"
    last, err = _child(tool, [*base, "--pretrained", tiny_sd3_path, "--model", "instaflow"])
    assert last == "EXIT 2 DIFFUSERS False TRANSFORMERS False", (last, err)
    assert err.startswith(f"{name}: error: ") and "family 'sd3'" in err and "family 'instaflow'" in err
    assert not (tmp_path / "out").exists()


def test_a_negative_guidance_scale_is_refused(tmp_path, capsys):
    for tool, flag in ((playground, "--guidance-scale"), (edit, "--sample-guidance"), (edit, "--edit-rfds-guidance")):
        argv = ["--out", str(tmp_path / "o"), flag, "-7.5", "--pretrained", str(tmp_path / "none")]
        argv += ["--prompt", "a"] if tool is playground else ["--image", "x.png", "--source-prompt", "a",
                                                               "--target-prompt", "b"]
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be a finite number >= 0 (0 = unconditional" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("quiet", [False, True])
def test_no_progress_silences_the_libraries_bars(tiny_sd3_path, tmp_path, capfd, quiet):
    argv = ["--prompt", "a cat", "--pretrained", tiny_sd3_path, "--device", "cpu", "--steps", "1", "--particles", "1",
            "--height", "32", "--width", "32", "--out", str(tmp_path / "o")] + (["--no-progress"] if quiet else [])
    assert playground.main(argv) == 0
    err = capfd.readouterr().err
    assert ("Loading weights" in err) is not quiet, err[-2000:]  # the bars are there without the flag
    assert ("it/s" in err) is not quiet
    if quiet:
        from transformers.utils import logging

        assert logging.is_progress_bar_enabled()  # restored for the rest of the process
