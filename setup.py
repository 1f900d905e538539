"""Install threestudio-rfds: the folder custom/threestudio-rfds is the package ``threestudio_rfds``."""
import os

from setuptools import setup

ROOT = "custom/threestudio-rfds"


def _packages():
    pkgs = []
    for dirpath, _dirs, files in os.walk(ROOT):
        if "__init__.py" in files and "__pycache__" not in dirpath:
            rel = os.path.relpath(dirpath, ROOT)
            pkgs.append("threestudio_rfds" + ("" if rel == "." else "." + rel.replace(os.sep, ".")))
    return sorted(pkgs)


def _version():
    with open(os.path.join(ROOT, "version.py")) as f:
        return f.read().split("=")[1].strip().strip('"')


setup(
    name="threestudio-rfds",
    version=_version(),
    description="Rectified-flow score distillation (RFDS, RFDS-Rev, iRFDS) from SD3/SD3.5, FLUX.1 and InstaFlow for threestudio",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    package_dir={"threestudio_rfds": ROOT},
    packages=_packages(),
    package_data={"threestudio_rfds": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.1,<3",
        "diffusers>=0.29,<1",
        "transformers>=4.41,<6",
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        "accelerate>=0.30",  # low-memory from_pretrained of multi-GB checkpoints
        "omegaconf>=2.3,<3",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "pillow>=9",
        "filelock>=3.12",
        "packaging>=21",
        "matplotlib>=3.7",  # loss curves of rfds-2d / rfds-edit and the benchmark report's plots
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "sentencepiece>=0.1.99",
            "protobuf>=3.20",
            "submitit>=1.5",  # rfds-bench's SLURM path is tested through submitit's local executors
            "gsplat>=1.5,<1.6",  # the Gaussian-splat path, tested on the CPU through tests/gsplat_torch.py
            "plyfile>=1.0",  # parses exported 3DGS PLY files independently of our writer
            "torchao>=0.15",  # the quantised-denoiser path is tested on the CPU (int8/float8 weight-only)
        ],
        "gs": ["gsplat>=1.5,<1.6"],  # rfds-gaussian-system (CUDA kernels compile on first use)
        "slurm": ["submitit>=1.5"],  # rfds-bench run --executor slurm
        # quantised denoiser (guidance option quantization: int8-weight-only / float8-weight-only through
        # diffusers' TorchAoConfig, whose minimum is torchao 0.15); NF4 needs bitsandbytes and a CUDA GPU instead
        "quant": ["torchao>=0.15"],
    },
    entry_points={
        "console_scripts": [
            "rfds-2d=threestudio_rfds.tools.playground:main",
            "rfds-edit=threestudio_rfds.tools.edit:main",
            "rfds-bench=threestudio_rfds.bench.cli:main",
            "rfds-benchmark-step=threestudio_rfds.steptime.guidance_step:main",
            "rfds-link=threestudio_rfds.adapter.link_cli:main",
            "rfds-setup=threestudio_rfds.adapter.setup_env:main",
        ]
    },
)
