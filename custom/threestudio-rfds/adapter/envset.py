"""The known-good environment, as data shared by ``rfds-setup`` (what to install) and the check
(what to accept): docs/threestudio.md "Known-good versions".

* :data:`COMPONENTS` — one row of the check each; ``pin`` is what ``rfds-setup`` installs,
  ``accept`` what the check calls ok.
* :data:`EXTRA_PINS` — further packages of the tested set that need no row of their own.
* :data:`REQUIREMENT_POLICY` — how each entry of threestudio's ``requirements.txt`` that conflicts
  with the set, or cannot be installed here, is replaced or skipped, and why.
* :data:`CUDA_BUILDS` — the CUDA extensions, built only where torch sees CUDA and nvcc exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

THREESTUDIO_COMMIT = "28d9d80d9d00f308244adfcf3be8b17ca0cb6465"  # tested: __version__ 0.2.3
THREESTUDIO_URL = "https://github.com/threestudio-project/threestudio"
TORCHVISION_FOR_TORCH: Dict[str, str] = {"2.14.1": "0.29.1"}  # torch public version → torchvision tested with it
MIN_TORCH = "2.1"


@dataclass(frozen=True)
class Component:
    """One library of the set: its distribution name, the pin ``rfds-setup`` installs (None: not
    installed by it), the version range the check accepts, and why other versions fail."""

    dist: str
    pin: Optional[str]
    accept: str  # packaging specifier; "" = any version
    why: str = ""
    optional: bool = False  # absence is fine
    fix: str = ""  # the command that repairs it; default: pip install <pin>


COMPONENTS: Tuple[Component, ...] = (
    Component("torchvision", None, "", "must be the build made for the installed torch"),
    Component("diffusers", "diffusers==0.42.1", ">=0.29", "SD3 needs diffusers >= 0.29 (threestudio pins <0.20)"),
    Component("transformers", "transformers==5.24.0", ">=4.41,<6", "SD3's text encoders need transformers >= 4.41"),
    Component("huggingface_hub", "huggingface_hub==2.4.0", ">=1.0",
              "the hub CLI `hf` (used in every hint) ships with huggingface_hub >= 1.0"),
    Component("pytorch-lightning", "pytorch-lightning==2.6.6", ">=2.0,<3", "threestudio imports pytorch_lightning 2.x"),
    Component("omegaconf", "omegaconf>=2.3,<2.4", ">=2.3,<2.4", "threestudio's configs need omegaconf 2.3"),
    Component("libigl", "libigl==2.5.1", ">=2.5,<2.6",
              "libigl 2.6 lacks fast_winding_number_for_meshes, which threestudio.utils.ops imports"),
    Component("bitsandbytes", None, ">=0.50",
              "bitsandbytes < 0.50 (threestudio pins 0.38.1) imports triton.ops, which current triton lacks, so "
              "`from diffusers import SD3Transformer2DModel` fails",
              optional=True, fix="pip uninstall -y bitsandbytes"),
    Component("nerfacc", "nerfacc==0.5.3", ">=0.5,<0.6", "threestudio's renderers use the nerfacc 0.5 API"),
    Component("envlight", "envlight==0.1.0", "", "threestudio's mesh materials import envlight"),
    Component("gsplat", "gsplat==1.5.3", ">=1.5,<1.6", "rfds-gaussian-system rasterises with gsplat 1.5's API"),
)

EXTRA_PINS: Tuple[str, ...] = ("plyfile", "protobuf", "scipy")  # threestudio-3dgs, T5 tokenizers, kornia/trimesh


def _pin(dist: str) -> str:
    return next(c.pin for c in COMPONENTS if c.dist == dist and c.pin)


# threestudio requirements.txt entry (distribution name, lower case) → (replacement pin or None, reason).
REQUIREMENT_POLICY: Dict[str, Tuple[Optional[str], str]] = {
    "lightning": (_pin("pytorch-lightning"), "threestudio imports pytorch_lightning; the tested set has "
                                             "pytorch-lightning 2.6.6, not lightning 2.0.0"),
    "diffusers": (_pin("diffusers"), "diffusers<0.20 cannot load SD3"),
    "transformers": (_pin("transformers"), "transformers==4.28.1 lacks SD3's text encoders"),
    "huggingface_hub": (_pin("huggingface_hub"), "the tested hub version (ships the `hf` CLI)"),
    "omegaconf": (_pin("omegaconf"), "the tested 2.3 series"),
    "libigl": (_pin("libigl"), "libigl 2.6 lacks fast_winding_number_for_meshes, which threestudio imports"),
    "nerfacc": (_pin("nerfacc"), "the git URL needs GitHub; nerfacc 0.5.3 from PyPI is the tested version"),
    "envlight": (_pin("envlight"), "the git URL needs GitHub; envlight 0.1.0 from PyPI is the tested version"),
    "opencv-python": ("opencv-python-headless", "the same cv2 without the GUI libraries (libGL) servers lack"),
    "bitsandbytes": (None, "bitsandbytes==0.38.1 breaks diffusers' model imports (No module named 'triton.ops'); "
                           "only DeepFloyd uses it: pip install 'bitsandbytes>=0.50' if you need it"),
    "xformers": (None, "each xformers wheel requires one exact torch and pip would replace yours; install the "
                       "xformers built for your torch yourself if you want it"),
    "gradio": (None, "gradio==4.11.0 pins numpy<2 and old web libraries; only threestudio's gradio_app.py uses it"),
    "tinycudann": (None, "a CUDA build from GitHub: rfds-setup builds it only where CUDA and nvcc exist"),
    "nvdiffrast": (None, "a CUDA build from GitHub: rfds-setup builds it only where CUDA and nvcc exist"),
    "clip": (None, "a git URL (needs GitHub); only zero123 guidance uses it: "
                   "pip install git+https://github.com/openai/CLIP.git"),
    "pysdf": (None, "source-only and its build failed on the tested Python 3.11 machine; only geometry shape_init "
                    "from a mesh file uses it (pip install pysdf, with a C++ compiler)"),
}


@dataclass(frozen=True)
class CudaBuild:
    """A CUDA extension: the row name, how to tell it is installed, and the command that builds it."""

    name: str
    dist: str  # distribution name
    command: str
    why: str
    jit: Optional[Tuple[str, str]] = None  # compiled on first use: (prebuilt module, JIT build name)


CUDA_BUILDS: Tuple[CudaBuild, ...] = (
    CudaBuild("tinycudann", "tinycudann",
              "pip install --no-build-isolation git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch",
              "threestudio's hash-grid NeRF geometry and MLPs"),
    CudaBuild("nvdiffrast", "nvdiffrast", "pip install --no-build-isolation git+https://github.com/NVlabs/nvdiffrast.git",
              "threestudio's mesh rasteriser (magic3d-system refinement)"),
    CudaBuild("nerfacc CUDA extension", "nerfacc",
              'python -c "from nerfacc.cuda._backend import _C; assert _C is not None"',
              "NeRF ray marching (nerfacc compiles it on first use; this builds it once, several minutes)",
              jit=("nerfacc.csrc", "nerfacc_cuda")),
    CudaBuild("gsplat CUDA kernels", "gsplat",
              'python -c "from gsplat.cuda._backend import _C; assert _C is not None"',
              "rfds-gaussian-system's rasteriser (gsplat compiles them on first use; this builds them once, "
              "several minutes)", jit=("gsplat.csrc", "gsplat_cuda")),
)

# threestudio-3dgs (DSaurus/threestudio-3dgs, no licence; the Inria rasteriser is for non-commercial
# research only), supported where a user put it in custom/: its CUDA builds, as its README installs them.
THREESTUDIO_3DGS = "threestudio-3dgs"
THREESTUDIO_3DGS_BUILDS: Tuple[CudaBuild, ...] = (
    CudaBuild("diff-gaussian-rasterization", "diff_gaussian_rasterization",
              "pip install --no-build-isolation git+https://github.com/ashawkey/diff-gaussian-rasterization",
              "threestudio-3dgs' rasteriser (Inria licence: non-commercial research only)"),
    CudaBuild("simple-knn", "simple_knn", "pip install --no-build-isolation git+https://github.com/DSaurus/simple-knn.git",
              "threestudio-3dgs' initial splat scales"),
)


def install_pins() -> List[str]:
    """The pins ``rfds-setup`` installs besides threestudio's remaining requirements."""
    return [c.pin for c in COMPONENTS if c.pin] + list(EXTRA_PINS)


def component(dist: str) -> Component:
    for c in COMPONENTS:
        if c.dist == dist:
            return c
    raise KeyError(f"no component {dist!r}; known: {[c.dist for c in COMPONENTS]}")
