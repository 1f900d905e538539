"""The README's plain-PyTorch example runs as written (on the tiny SD3 model, at 64² px)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_install_and_test_commands():
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert "pip install torch==2.13.0" in blocks[0] and 'pip install -e ".[test]"' in blocks[0]
    assert blocks[1].strip() == "python -m pytest -q"


def test_readme_python_example_runs(tiny_sd3_path, capsys):
    (code,) = _python_blocks()
    code = code.replace('"stabilityai/stable-diffusion-3-medium-diffusers"', repr(tiny_sd3_path))
    code = code.replace("1, 3, 512, 512", "1, 3, 64, 64").replace("guidance_scale=100.0", "guidance_scale=5.0")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    render = scope["render"]
    assert render.grad is not None and render.grad.abs().sum() > 0
    assert "grad_norm" in capsys.readouterr().out
