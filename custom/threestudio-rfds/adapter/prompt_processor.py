"""threestudio prompt processors for SD3 and FLUX.1 (sequence + pooled embeddings) and InstaFlow (CLIP).

All keep threestudio's machinery: view-dependent prompts, Perp-Neg, prompt debiasing, the
on-disk cache ``.threestudio_cache/text_embeddings`` (one subfolder per encoder setting) and the
``spawn`` subprocess that encodes prompts so the text encoders never share GPU memory with the
flow model.  The encoding itself is :func:`threestudio_rfds.text.encode_prompts`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .cache_worker import child_error, new_error_file, options_tag, spawn_target
from .compat import adapter_device, require_threestudio

require_threestudio()
from pytorch_lightning.utilities.rank_zero import rank_zero_only  # noqa: E402
from threestudio.models.prompt_processors.base import PromptProcessor, PromptProcessorOutput  # noqa: E402
from threestudio.models.prompt_processors.stable_diffusion_prompt_processor import (  # noqa: E402
    StableDiffusionPromptProcessor,
)
from threestudio.utils.misc import barrier  # noqa: E402

CACHE_ROOT = ".threestudio_cache/text_embeddings"  # threestudio's (hard-coded there as well)


class PromptEncodingError(RuntimeError):
    """Encoding the prompts failed in threestudio's spawned subprocess; the message is the child's error."""


@dataclass
class RFDSPromptProcessorOutput(PromptProcessorOutput):
    """threestudio's output plus SD3's pooled embeddings ([1, P] and [Nv, P] per direction).

    ``get_text_embeddings`` and ``get_text_embeddings_perp_neg`` return threestudio's tensors
    without host syncs (threestudio assigns through boolean masks, four syncs per step on CUDA,
    and loops over the cameras for Perp-Neg, more per camera); the ``get_pooled_*`` twins return
    the matching pooled embeddings."""

    pooled_embeddings: Optional[Tensor] = None
    uncond_pooled_embeddings: Optional[Tensor] = None
    pooled_embeddings_vd: Optional[Tensor] = None
    uncond_pooled_embeddings_vd: Optional[Tensor] = None

    @property
    def has_pooled(self) -> bool:
        return self.pooled_embeddings is not None

    def _require_pooled(self) -> None:
        if not self.has_pooled:
            raise ValueError("these prompt embeddings carry no pooled embeddings (use rfds-sd3-prompt-processor or "
                             "rfds-flux-prompt-processor)")

    def direction_index(self, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor) -> Tensor:
        """Index of the view direction of each camera (threestudio's rule: later directions win)."""
        idx = torch.zeros_like(elevation, dtype=torch.long)
        for d in self.directions:  # torch.where, not idx[mask] = i: no host sync
            idx = torch.where(d.condition(elevation, azimuth, camera_distances), self.direction2idx[d.name], idx)
        return idx

    def get_text_embeddings(
        self, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor, view_dependent_prompting: bool = True
    ) -> Tensor:
        """[2B, L, D]: (cond, uncond) sequence embeddings, as threestudio's."""
        if view_dependent_prompting:
            idx = self.direction_index(elevation, azimuth, camera_distances)
            return torch.cat([self.text_embeddings_vd[idx], self.uncond_text_embeddings_vd[idx]], dim=0)
        b = elevation.shape[0]
        return torch.cat([self.text_embeddings.expand(b, -1, -1), self.uncond_text_embeddings.expand(b, -1, -1)], dim=0)

    def get_pooled_embeddings(
        self, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor, view_dependent_prompting: bool = True
    ) -> Tensor:
        """[2B, P]: (cond, uncond) pooled embeddings, the order of ``get_text_embeddings``."""
        self._require_pooled()
        b = elevation.shape[0]
        if view_dependent_prompting:
            idx = self.direction_index(elevation, azimuth, camera_distances)
            cond, uncond = self.pooled_embeddings_vd[idx], self.uncond_pooled_embeddings_vd[idx]
        else:
            cond = self.pooled_embeddings.expand(b, -1)
            uncond = self.uncond_pooled_embeddings.expand(b, -1)
        return torch.cat([cond, uncond], dim=0)

    def perp_neg_embeddings(self, emb_vd: Tensor, uncond_vd: Tensor, elevation: Tensor, azimuth: Tensor,
                            camera_distances: Tensor, view_dependent_prompting: bool = True) -> Tuple[Tensor, Tensor]:
        """threestudio's Perp-Neg rule for per-direction embeddings ``emb_vd`` [Nv, ...], batched
        (threestudio loops over the cameras and syncs on each; the tensors are the same):

            overhead camera: positive = overhead, negatives = (uncond, uncond), weights (0, 0)
            |azimuth| < 90:  r = 1 − |azimuth|/90, positive = r·front + (1−r)·side,
                             negatives = (front, side), weights −(f_fs(r), f_sf(1−r))
            otherwise:       r = 2 − |azimuth|/90, positive = r·side + (1−r)·back,
                             negatives = (side, front), weights −(f_sb(r), f_fsb(r))

        with f(a, b, c; r) = a·exp(−b·r) + c.  Returns ([4B, ...] = (positives, uncond, the two
        negatives of each camera in turn), weights [B, 2])."""
        if not view_dependent_prompting:
            raise ValueError("Perp-Neg needs view_dependent_prompting=True")
        idx = self.direction_index(elevation, azimuth, camera_distances)
        side, front, back, overhead = (emb_vd[self.direction2idx[n]] for n in ("side", "front", "back", "overhead"))
        abs_azi = (((azimuth + 180) % 360) - 180).abs()  # threestudio's shift_azimuth_deg, then |·|
        front_half = abs_azi < 90
        r = torch.where(front_half, 1 - abs_azi / 90, 2.0 - abs_azi / 90)
        top = idx == self.direction2idx["overhead"]

        def per_camera(cond: Tensor) -> Tensor:  # [B] → [B, 1, …] against [Nv-less] embeddings
            return cond.reshape(-1, *([1] * side.ndim))

        rb, fh, tb, uncond = per_camera(r), per_camera(front_half), per_camera(top), uncond_vd[idx]
        positive = torch.where(fh, rb * front + (1 - rb) * side, rb * side + (1 - rb) * back)
        positive = torch.where(tb, overhead, positive)
        neg1 = torch.where(tb, uncond, torch.where(fh, front, side))
        neg2 = torch.where(tb, uncond, torch.where(fh, side, front))

        def decay(abc, x):
            a, b, c = abc
            return a * torch.exp(-b * x) + c

        w1 = torch.where(front_half, -decay(self.perp_neg_f_fs, r), -decay(self.perp_neg_f_sb, r))
        w2 = torch.where(front_half, -decay(self.perp_neg_f_sf, 1 - r), -decay(self.perp_neg_f_fsb, r))
        weights = torch.where(top[:, None], 0.0, torch.stack([w1, w2], dim=1))
        negatives = torch.stack([neg1, neg2], dim=1).flatten(0, 1)
        return torch.cat([positive, uncond, negatives], dim=0), weights

    def get_text_embeddings_perp_neg(
        self, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor, view_dependent_prompting: bool = True
    ) -> Tuple[Tensor, Tensor]:
        """([4B, L, D], weights [B, 2]): threestudio's, without its per-camera loop and syncs."""
        return self.perp_neg_embeddings(self.text_embeddings_vd, self.uncond_text_embeddings_vd, elevation, azimuth,
                                        camera_distances, view_dependent_prompting)

    def get_pooled_embeddings_perp_neg(
        self, elevation: Tensor, azimuth: Tensor, camera_distances: Tensor, view_dependent_prompting: bool = True
    ) -> Tuple[Tensor, Tensor]:
        """([4B, P] as (positive, uncond, 2 negatives per sample), weights [B, 2]): the Perp-Neg
        rule applied to the pooled embeddings."""
        self._require_pooled()
        return self.perp_neg_embeddings(self.pooled_embeddings_vd, self.uncond_pooled_embeddings_vd, elevation,
                                        azimuth, camera_distances, view_dependent_prompting)


class _RFDSCacheMixin:
    """Device fallback, a cache subfolder per encoder setting, a picklable spawn target and
    :class:`RFDSPromptProcessorOutput` as the output."""

    family: str = ""

    def pooled_outputs(self) -> dict:
        """The pooled-embedding fields of the output (none for CLIP-only models)."""
        return {}

    def __call__(self) -> RFDSPromptProcessorOutput:
        base = PromptProcessor.__call__(self)
        return RFDSPromptProcessorOutput(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                                         **self.pooled_outputs())

    def encoder_options(self) -> dict:
        return {"device": "auto", "dtype": self.cfg.encode_dtype, "local_files_only": self.cfg.local_files_only}

    @property
    def spawn_func(self):  # threestudio calls self.spawn_func(model, prompts, cache_dir), maybe in a child
        return spawn_target(self.family, self.encoder_options(), getattr(self, "_error_file", None))

    def _use_rfds_cache_dir(self) -> None:
        """One subfolder per encoder setting and per text-encoder weights (the fingerprint the core
        cache keys on), so changed weights are re-encoded instead of served from the old files."""
        from ..text.cache import model_fingerprint

        fingerprint = model_fingerprint(self.cfg.pretrained_model_name_or_path)
        self._cache_dir = os.path.join(CACHE_ROOT, options_tag(self.family, {**self.encoder_options(),
                                                                            "fingerprint": fingerprint}))

    def configure(self) -> None:
        self.device = adapter_device()
        super().configure()

    @rank_zero_only
    def prepare_text_embeddings(self):
        """threestudio's, but a failed ``spawn`` child's own error is raised instead of threestudio's
        bare "prompt embedding process failed!" assertion."""
        self._use_rfds_cache_dir()
        self._error_file = new_error_file() if self.cfg.spawn else None
        try:
            super().prepare_text_embeddings()
        except AssertionError as e:
            if self._error_file is None or "prompt embedding process failed" not in str(e):
                raise
            raise PromptEncodingError(f"the prompt embedding subprocess failed: {child_error(self._error_file)}") from None
        finally:
            if self._error_file is not None and os.path.exists(self._error_file):
                os.remove(self._error_file)
            self._error_file = None

    def load_text_embeddings(self):
        self._use_rfds_cache_dir()
        super().load_text_embeddings()


class _PooledPromptProcessor(_RFDSCacheMixin, PromptProcessor):
    """Sequence + pooled embeddings per prompt (SD3, FLUX): each cache file holds both."""

    def load_text_embeddings(self):
        self._use_rfds_cache_dir()
        barrier()

        def stack(prompts):  # each cache file read once: (sequence [N, L, D], pooled [N, P])
            items = [self.load_from_cache(p) for p in prompts]
            return tuple(torch.stack([it[k] for it in items]) for k in ("prompt_embeds", "pooled_prompt_embeds"))

        self.text_embeddings, self.pooled_embeddings = stack([self.prompt])
        self.uncond_text_embeddings, self.uncond_pooled_embeddings = stack([self.negative_prompt])
        self.text_embeddings_vd, self.pooled_embeddings_vd = stack(self.prompts_vd)
        self.uncond_text_embeddings_vd, self.uncond_pooled_embeddings_vd = stack(self.negative_prompts_vd)

    def pooled_outputs(self) -> dict:
        return {"pooled_embeddings": self.pooled_embeddings, "uncond_pooled_embeddings": self.uncond_pooled_embeddings,
                "pooled_embeddings_vd": self.pooled_embeddings_vd,
                "uncond_pooled_embeddings_vd": self.uncond_pooled_embeddings_vd}


class SD3PromptProcessor(_PooledPromptProcessor):
    """SD3 / SD3.5 prompts → ``prompt_embeds`` [L, D] and ``pooled_prompt_embeds`` [P] per prompt."""

    family = "sd3"

    @dataclass
    class Config(PromptProcessor.Config):
        pretrained_model_name_or_path: str = "stabilityai/stable-diffusion-3-medium-diffusers"
        use_t5: bool = True  # False: zeros in place of T5 (no 4.7B-parameter encoder, less memory)
        max_sequence_length: int = 256  # T5 tokens
        clip_skip: Optional[int] = None
        encode_dtype: str = "auto"  # text encoders' dtype: auto = bf16 on CUDA, fp32 on CPU
        local_files_only: Optional[bool] = None

    cfg: Config

    def encoder_options(self) -> dict:
        return {**super().encoder_options(), "use_t5": self.cfg.use_t5,
                "max_sequence_length": self.cfg.max_sequence_length, "clip_skip": self.cfg.clip_skip}


class FluxPromptProcessor(_PooledPromptProcessor):
    """FLUX.1 prompts → T5 ``prompt_embeds`` [T, 4096] and CLIP-L ``pooled_prompt_embeds`` [768] per prompt
    (``FluxPipeline.encode_prompt``), with the SD3 processor's cache and subprocess encoding."""

    family = "flux"

    @dataclass
    class Config(PromptProcessor.Config):
        pretrained_model_name_or_path: str = "black-forest-labs/FLUX.1-schnell"
        max_sequence_length: Optional[int] = None  # T5 tokens; None: 512 for [dev], 256 for [schnell] (as diffusers)
        encode_dtype: str = "auto"  # text encoders' dtype: auto = bf16 on CUDA, fp32 on CPU
        local_files_only: Optional[bool] = None

    cfg: Config

    def encoder_options(self) -> dict:
        return {**super().encoder_options(), "max_sequence_length": self.cfg.max_sequence_length}


class InstaFlowPromptProcessor(_RFDSCacheMixin, StableDiffusionPromptProcessor):
    """InstaFlow / SD1.5 CLIP prompts, as threestudio's ``stable-diffusion-prompt-processor``
    (same tensors) but runnable without CUDA and encoded by :mod:`threestudio_rfds.text.clip`."""

    family = "instaflow"

    @dataclass
    class Config(StableDiffusionPromptProcessor.Config):
        pretrained_model_name_or_path: str = "XCLIU/2_rectified_flow_from_sd_1_5"
        encode_dtype: str = "fp32"  # threestudio's processor stores fp32 CLIP states
        local_files_only: Optional[bool] = None

    cfg: Config


PROMPT_PROCESSORS = {
    "rfds-sd3-prompt-processor": SD3PromptProcessor,
    "rfds-flux-prompt-processor": FluxPromptProcessor,
    "rfds-instaflow-prompt-processor": InstaFlowPromptProcessor,
}
