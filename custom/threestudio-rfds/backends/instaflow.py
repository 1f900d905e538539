"""InstaFlow (2-rectified flow distilled from SD1.5) as a :class:`~threestudio_rfds.protocol.LatentBackend`.

The UNet is fed ``timestep = 1000·t`` and predicts x0 − ε = −v_t (flow.instaflow_convention);
``time_convention="reference"`` reproduces the paper's code, which labels a latent of noise level
t with the timestep of 1 − t (docs/backends.md).  Latents are SD1.5's: 4 channels, VAE × 0.18215.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
from types import SimpleNamespace
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import flow
from ..checks import DeferredChecks, check_choice, check_shape
from ..protocol import Cond, cfg_velocity, expand_cond
from .base import (COMPILE_MODES, configure_vae, freeze, hub_kwargs, latent_noise_shape, load_component,
                   maybe_compile, prepare_rgb, resolve_device, resolve_dtype, vae_input)
from .family import check_family

DEFAULT_MODEL = "XCLIU/2_rectified_flow_from_sd_1_5"
# the reference names runwayml/stable-diffusion-v1-5, since removed from the hub; this is its official mirror
REFERENCE_DELTA = {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5", "finetuned": "Lykon/absolute-reality-1.81"}
LATENT_CHANNELS = 4


def unet_delta_state(base: torch.nn.Module, finetuned: torch.nn.Module) -> Dict[str, Tensor]:
    """dW = W_finetuned − W_base for every parameter and buffer (the two must share keys and shapes)."""
    sb, sf = base.state_dict(), finetuned.state_dict()
    if set(sb) != set(sf):
        diff = sorted(set(sb) ^ set(sf))[:5]
        raise ValueError(f"unet_delta: base and finetuned UNets have different weights, e.g. {diff}")
    delta = {}
    for k, w in sf.items():
        if w.shape != sb[k].shape:
            raise ValueError(f"unet_delta: weight {k!r} has shape {tuple(w.shape)} vs base {tuple(sb[k].shape)}")
        delta[k] = w.float() - sb[k].float()
    return delta


def merged_unet_state(state: Dict[str, Tensor], delta: Dict[str, Tensor], alpha: float = 1.0) -> Dict[str, Tensor]:
    """W + α·dW for every weight of ``state`` (the InstaFlow UNet's), as new fp32 tensors:
    ``state`` itself is never written, so a failed merge leaves the UNet as it was loaded."""
    missing = sorted(set(delta) - set(state))
    if missing:
        raise ValueError(f"unet_delta: the InstaFlow UNet has no weights {missing[:5]}")
    for k, d in delta.items():
        if state[k].shape != d.shape:
            raise ValueError(f"unet_delta: weight {k!r} has shape {tuple(d.shape)} vs InstaFlow {tuple(state[k].shape)}")
    with torch.no_grad():
        return {k: w.detach().float() + alpha * delta[k].to(w.device) if k in delta else w.detach().float().clone()
                for k, w in state.items()}


# ---------------------------------------------------------------- merge cache
MERGE_CACHE_FORMAT = 2  # 2: entries carry their identities and the sha256 of their tensors
log = logging.getLogger("threestudio_rfds")


def default_merge_cache_dir() -> str:
    """``$RFDS_CACHE_DIR/merged-unets``, else ``~/.cache/threestudio_rfds/merged-unets``."""
    root = os.environ.get("RFDS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "threestudio_rfds")
    return os.path.join(root, "merged-unets")


def resolve_merge_cache(merge_cache) -> Optional[str]:
    """True → the default folder, False/None → no cache, a non-empty string → that folder (which
    must not be an existing file)."""
    if merge_cache is None or merge_cache is False:
        return None
    if merge_cache is True:
        folder = default_merge_cache_dir()
    elif isinstance(merge_cache, str) and merge_cache:
        folder = os.path.abspath(os.path.expanduser(merge_cache))
    else:
        raise ValueError(f"merge_cache must be true, false or a folder path, got {merge_cache!r}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"merge_cache {folder!r} exists and is not a folder; pass a folder path, true "
                         f"(the default {default_merge_cache_dir()}) or false (no cache)")
    return folder


def unet_identity(path: str, revision: Optional[str] = None) -> Optional[dict]:
    """What identifies the UNet weights of ``path``: a local folder by (file, size, mtime) of its
    ``unet/`` files (the text cache's fingerprint); a hub id by the commit that its locally cached
    ``unet/config.json`` resolves to for ``revision`` (None while it is not in the local cache)."""
    if os.path.isdir(path):
        from ..text.cache import model_fingerprint

        return {"folder": os.path.abspath(path), "files": model_fingerprint(path, ("unet",))}
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "unet/config.json", revision=revision)
    except Exception:  # an id the hub client rejects: not cacheable
        return None
    if not isinstance(found, str):
        return None
    return {"repo": path, "commit": os.path.basename(os.path.dirname(os.path.dirname(found)))}


def merge_cache_entry(instaflow: Optional[dict], base: Optional[dict], finetuned: Optional[dict],
                      alpha: float) -> Optional[str]:
    """The canonical JSON of one merge (the three models' identities and α), stored in its cache
    file; None when one of the models has no identity yet."""
    if instaflow is None or base is None or finetuned is None:
        return None
    return json.dumps({"format": MERGE_CACHE_FORMAT, "instaflow": instaflow, "base": base, "finetuned": finetuned,
                       "alpha": float(alpha)}, sort_keys=True, default=str)


def _entry_file(cache_dir: str, entry: str) -> str:
    return os.path.join(cache_dir, hashlib.sha256(entry.encode()).hexdigest() + ".safetensors")


def load_merged_unet_state(cache_dir: str, entry: str, like: Dict[str, Tensor]) -> Tuple[Optional[Dict[str, Tensor]], str]:
    """(the cached merged weights, "") when the file of ``entry`` exists, names that entry, its
    tensors hash to the digest it carries, and it has exactly the keys and shapes of ``like``;
    else (None, why) — why is "" for an absent file.  Reads without the cache lock: entries are
    replaced atomically, and the one open file gives metadata and tensors of the same version."""
    from safetensors import safe_open

    from ..text.cache import tensors_digest

    try:
        with safe_open(_entry_file(cache_dir, entry), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        return None, ""
    except Exception as e:  # unreadable, truncated, not safetensors
        return None, f"unreadable ({type(e).__name__}: {e})"
    if meta.get("entry") != entry:
        return None, "it was written for another merge"
    if meta.get("sha256") != tensors_digest(state):
        return None, "its tensors do not match the digest it was written with"
    if set(state) != set(like):
        diff = sorted(set(state) ^ set(like))
        return None, f"{len(diff)} weight(s) missing or extra, e.g. {diff[:3]}"
    bad = [k for k, w in like.items() if tuple(state[k].shape) != tuple(w.shape)]
    if bad:
        return None, f"weight {bad[0]!r} has shape {tuple(state[bad[0]].shape)}, the UNet {tuple(like[bad[0]].shape)}"
    return state, ""


def save_merged_unet_state(cache_dir: str, entry: str, state: Dict[str, Tensor]) -> str:
    """Write the merged weights with their entry and digest atomically (temporary file +
    os.replace, atomic.atomic_write)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ..atomic import atomic_write
    from ..text.cache import tensors_digest

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"entry": entry, "sha256": tensors_digest(state)}

    def write(tmp: str) -> None:
        try:
            save_file(state, tmp, metadata=meta)
        except SafetensorError as e:  # how safetensors reports I/O errors (a full disk)
            raise OSError(f"{e} writing {tmp}") from e

    return atomic_write(_entry_file(cache_dir, entry), write)


@contextlib.contextmanager
def merge_lock(cache_dir: str) -> Iterator[bool]:
    """The cache folder's lock (concurrent runs merge once); yields False, after one warning,
    where the folder cannot be created or locked (read-only, full disk): merge uncached."""
    from filelock import FileLock

    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = FileLock(os.path.join(cache_dir, ".lock"), timeout=3600)
        lock.acquire()
    except OSError as e:
        log.warning(f"merge cache: cannot write to {cache_dir} ({e.strerror or e}); the merged UNet is computed "
                    "and used uncached")
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _check_delta_spec(spec) -> None:
    if not isinstance(spec, dict) or not {"base", "finetuned"} <= set(spec) or set(spec) - {"base", "finetuned", "alpha"}:
        raise ValueError(
            "unet_delta must be a dict with keys 'base' and 'finetuned' (and optional 'alpha'), "
            f"e.g. {REFERENCE_DELTA}; got {spec!r}"
        )


class InstaFlowBackend:
    """UNet + VAE of InstaFlow; ``velocity`` in the project's notation (v = ε − x0).

    Condition: ``{"encoder_hidden_states": [B, 77, D]}`` (CLIP ViT-L last hidden state, D = 768),
    see :func:`threestudio_rfds.text.clip.encode_clip_prompts`.

    Args:
        pretrained_model_name_or_path: hub id or local diffusers folder (``unet`` and ``vae`` are loaded).
        device, dtype: "auto" → cuda/bf16 when available, else cpu/fp32; "fp16"/"fp32"/"bf16".
        time_convention: "model" (timestep 1000·t) or "reference" (the paper's code: 1000·(1 − t)).
        latent_rule, latent_size: "resize" renders to ``latent_size`` first (reference: 512²) or
            encode them at their own size ("native", multiples of 8).
        unet_delta: opt-in ``{"base", "finetuned"[, "alpha"]}``: W += α·(W_finetuned − W_base) (reference:
            :data:`REFERENCE_DELTA`); both UNets are fetched only when named here.
        merge_cache: where the merged UNet is cached (the merge reads two more full UNets): True = the
            default folder (:func:`default_merge_cache_dir`), a folder path, or False (always merge).
            Keyed on the identities of the three models (:func:`unet_identity`) and α; each entry
            carries its identities and a sha256 of its tensors, checked on every load.
        vae_path, vae_subfolder: take the VAE from another model (the reference uses the fine-tune's).
        compile: ``torch.compile`` the UNet in place (True or "max-autotune-no-cudagraphs"; docs/performance.md).
        vae_channels_last: channels-last VAE (off: no measured gain on an H100, docs/performance.md).
        vae_checkpointing: gradient checkpointing in the VAE encoder (memory-lean mode).
    """

    latent_channels = LATENT_CHANNELS

    def __init__(
        self,
        pretrained_model_name_or_path: str = DEFAULT_MODEL,
        *,
        device: Union[str, torch.device] = "auto",
        dtype: Union[str, torch.dtype] = "auto",
        time_convention: str = "model",
        latent_rule: str = "resize",
        latent_size: Tuple[int, int] = (512, 512),
        local_files_only: Optional[bool] = None,
        revision: Optional[str] = None,
        unet_delta: Optional[dict] = None,
        vae_path: Optional[str] = None,
        vae_subfolder: Optional[str] = "vae",
        compile: Union[bool, str] = False,
        vae_channels_last: bool = False,
        vae_checkpointing: bool = False,
        merge_cache: Union[bool, str, None] = True,
    ):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        cache_dir = resolve_merge_cache(merge_cache)
        if unet_delta is not None:
            _check_delta_spec(unet_delta)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        kw = hub_kwargs(revision, local_files_only)
        path = pretrained_model_name_or_path
        sources = [(path, revision), (vae_path, revision)] + [(unet_delta[k], None) for k in ("base", "finetuned")
                                                              if unet_delta]
        for source, rev in sources:  # every folder the UNet and VAE come from is an SD1.5-family model
            if source is not None:
                check_family("instaflow", source, rev, local_files_only)
        # the delta is added in fp32, then the merged UNet is cast to dt
        unet = load_component(UNet2DConditionModel, path, "unet", torch_dtype=torch.float32 if unet_delta else dt, **kw)
        if unet_delta:
            self._merge(unet, unet_delta, path, revision, local_files_only, cache_dir)
        vae = load_component(AutoencoderKL, vae_path or path, vae_subfolder if vae_path else "vae", torch_dtype=dt, **kw)
        self._setup(unet, vae, dev, dt, time_convention, latent_rule, latent_size, name=path,
                    compile=compile, vae_channels_last=vae_channels_last, vae_checkpointing=vae_checkpointing)

    @classmethod
    def from_modules(
        cls,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        *,
        time_convention: str = "model",
        latent_rule: str = "resize",
        latent_size: Tuple[int, int] = (512, 512),
        model_id: str = "modules",
        compile: Union[bool, str] = False,
        vae_channels_last: bool = False,
        vae_checkpointing: bool = False,
    ) -> "InstaFlowBackend":
        """Wrap already-built modules (benchmarks, tests); device and dtype are the UNet's."""
        self = cls.__new__(cls)
        p = next(unet.parameters())
        self._setup(unet, vae, p.device, p.dtype, time_convention, latent_rule, latent_size, name=model_id,
                    compile=compile, vae_channels_last=vae_channels_last, vae_checkpointing=vae_checkpointing)
        return self

    @classmethod
    def _merge(cls, unet, spec: dict, path: str, revision, local_files_only, cache_dir: Optional[str]) -> None:
        """unet ← unet + α·(finetuned − base), from a verified cache entry when there is one
        (:func:`load_merged_unet_state`), else computed into new tensors and stored.  The UNet is
        written once, with a complete state: never a merge on top of a partly loaded entry."""
        alpha = float(spec.get("alpha", 1.0))

        def entry():
            return merge_cache_entry(unet_identity(path, revision), unet_identity(spec["base"]),
                                     unet_identity(spec["finetuned"]), alpha)

        state = unet.state_dict()
        e = entry() if cache_dir is not None else None
        merged, why = load_merged_unet_state(cache_dir, e, state) if e is not None else (None, "")
        if merged is None:
            with (merge_lock(cache_dir) if cache_dir is not None else contextlib.nullcontext(False)) as writable:
                if writable and e is not None and not why:  # another run may have stored it meanwhile
                    merged, why = load_merged_unet_state(cache_dir, e, state)
                if merged is None:
                    if why:
                        log.warning(f"merge cache: the entry for this merge in {cache_dir} is not used: {why}; "
                                    "recomputing it")
                    merged = merged_unet_state(state, *cls._load_delta(spec, local_files_only))
                    e = e or entry()  # hub models are identifiable once downloaded
                    if writable and e is not None:
                        try:
                            save_merged_unet_state(cache_dir, e, merged)
                        except OSError as err:
                            log.warning(f"merge cache: could not store the merged UNet in {cache_dir} "
                                        f"({err.strerror or err}); it is used uncached")
        unet.load_state_dict(merged, strict=True)

    @staticmethod
    def _load_delta(spec: dict, local_files_only: Optional[bool]):
        from diffusers import UNet2DConditionModel

        kw = dict(hub_kwargs(local_files_only=local_files_only), torch_dtype=torch.float32)
        base = load_component(UNet2DConditionModel, spec["base"], "unet", **kw)
        fine = load_component(UNet2DConditionModel, spec["finetuned"], "unet", **kw)
        delta = unet_delta_state(base, fine)
        del base, fine
        gc.collect()
        return delta, float(spec.get("alpha", 1.0))

    def _setup(self, unet, vae, device, dtype, time_convention, latent_rule, latent_size, name, *,
               compile=False, vae_channels_last=False, vae_checkpointing=False) -> None:
        check_choice("latent_rule", latent_rule, ("native", "resize"))
        check_choice("compile", compile, COMPILE_MODES)
        for what, n in (("UNet in_channels", unet.config.in_channels), ("VAE latent_channels", vae.config.latent_channels)):
            if n != LATENT_CHANNELS:
                raise ValueError(f"{name!r}: {what} is {n}, InstaFlow/SD1.5 latents have {LATENT_CHANNELS} channels")
        self.model_id, self.device, self.dtype = name, torch.device(device), dtype
        self.unet, self.vae = freeze(unet, self.device, dtype), freeze(vae, self.device, dtype)
        self.convention = flow.instaflow_convention(time_convention)
        self.time_convention, self.latent_rule = time_convention, latent_rule
        self.latent_size = tuple(latent_size)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.cross_attention_dim = int(unet.config.cross_attention_dim)
        self.vae_channels_last = bool(vae_channels_last)
        configure_vae(self.vae, channels_last=self.vae_channels_last, checkpointing=vae_checkpointing)
        maybe_compile(self.unet, compile)

    # ------------------------------------------------------------------ velocity
    def _unet_velocity(self, x_t: Tensor, t: Tensor, cond: Cond, convention: flow.FlowConvention) -> Tensor:
        check_shape("x_t", x_t, ndim=4, channels=LATENT_CHANNELS)
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape [B] = [{x_t.shape[0]}], got {tuple(t.shape)}")
        self.check_cond(cond)
        ehs = expand_cond(cond, x_t.shape[0])["encoder_hidden_states"]
        timestep = convention.model_timestep(t.to(self.device, torch.float32))
        out = self.unet(x_t.to(self.device, self.dtype), timestep,
                        encoder_hidden_states=ehs.to(self.device, self.dtype)).sample
        return convention.to_velocity(out).to(x_t.dtype)

    def check_cond(self, cond: Cond, name: str = "cond") -> None:
        """The key and width the UNet needs; one line naming ``name``, the key, the shape given and
        the shape needed (called by ``cfg_velocity`` for cond and uncond)."""
        if "encoder_hidden_states" not in cond:
            raise ValueError(f"{name}: the InstaFlow condition needs key 'encoder_hidden_states' [B, 77, D], got keys "
                             f"{sorted(cond)}")
        ehs = cond["encoder_hidden_states"]
        if ehs.ndim != 3 or ehs.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"{name}['encoder_hidden_states'] must be [B, L, {self.cross_attention_dim}] (the UNet's "
                             f"cross_attention_dim), got {tuple(ehs.shape)}")

    def velocity(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """v_t = −UNet(x_t, convention.model_timestep(t), c)  (InstaFlow predicts x0 − ε)."""
        return self._unet_velocity(x_t, t, cond, self.convention)

    # ------------------------------------------------------------------ codec
    def latent_shape(self, height: int, width: int) -> Tuple[int, int]:
        """Latent (h, w) of a render of the given size under the latent rule."""
        if self.latent_rule == "resize":
            height, width = self.latent_size
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def encode(self, rgb: Tensor, generator: Optional[torch.Generator] = None,
               checks: Optional[DeferredChecks] = None) -> Tensor:
        """z = 0.18215 · sample(VAE.enc(2·rgb − 1)), differentiable wrt rgb [B,3,H,W] in [0,1]; rgb is
        checked as in SD3Backend.encode (base.check_rgb, queued on ``checks`` when given)."""
        x = prepare_rgb(rgb, self.latent_rule, self.latent_size, self.vae_scale_factor, checks)
        posterior = self.vae.encode(vae_input(x.to(self.device, self.dtype), self.vae_channels_last)).latent_dist
        return (posterior.sample(generator) * self.scaling_factor).to(rgb.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """rgb = (VAE.dec(z / 0.18215) + 1) / 2 clamped to [0, 1]."""
        check_shape("latents", latents, ndim=4, channels=LATENT_CHANNELS)
        image = self.vae.decode(latents.to(self.device, self.dtype) / self.scaling_factor).sample
        return (image.float() * 0.5 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        uncond: Optional[Cond] = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 1,
        *,
        latents: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        batch_size: Optional[int] = None,
    ) -> Tensor:
        """Euler sampling of the InstaFlow pipeline: for i < N, T_i = 1000·(1 − i/N),
        x ← x + (1/N)·û with û = u_∅ + w·(u_c − u_∅) the network's (x0 − ε) output, i.e.
        :func:`flow.euler_sample` on t = 1 → 0 with the model's own time convention (also when
        this backend uses the "reference" convention).  CFG only when ``uncond`` is given and w > 1,
        as the pipeline.  Returns latents [B, 4, H/8, W/8] (``output_type="latent"``)."""
        if latents is None:
            shape = latent_noise_shape(batch_size or int(cond["encoder_hidden_states"].shape[0]), LATENT_CHANNELS,
                                       height, width, self.unet.config.sample_size, self.vae_scale_factor)
            gen_device = generator.device if generator is not None else self.device
            latents = torch.randn(shape, generator=generator, device=gen_device)
        latents = latents.to(self.device, torch.float32)
        conv = flow.instaflow_convention("model")
        model = SimpleNamespace(convention=conv, velocity=lambda x, t, c: self._unet_velocity(x, t, c, conv))
        if uncond is not None and guidance_scale > 1.0:
            velocity = lambda x, t: cfg_velocity(model, x, t, cond, uncond, guidance_scale)  # noqa: E731
        else:
            velocity = lambda x, t: model.velocity(x, t, cond)  # noqa: E731
        return flow.euler_sample(velocity, latents, flow.time_grid(num_inference_steps, device=self.device))
