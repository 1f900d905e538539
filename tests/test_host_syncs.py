"""A guidance step (VAE encode, CFG velocity, target, backward) queues its work without a host
sync: the only syncing call is the deferred check of the render, x0, v̂, g and the loss value,
made after every model call has been queued (issue: no per-step host syncs).  Recorded on CPU
with a TorchFunctionMode."""
import pytest
import torch

from random_conds import random_conds
from sync_recorder import SyncRecorder
from threestudio_rfds import rfds as core
from threestudio_rfds.checks import DeferredChecks
from threestudio_rfds.backends import load_backend
from threestudio_rfds.protocol import for_latents

DEFERRED_CHECK = ("__bool__", "checks.py")


@pytest.fixture(scope="module", params=["sd3", "flux-dev", "instaflow"])
def backend(request, tiny_sd3_path, tiny_flux_paths, tiny_instaflow_path):
    if request.param == "sd3":
        return load_backend("sd3", pretrained_model_name_or_path=tiny_sd3_path, device="cpu")
    if request.param == "flux-dev":  # resolution-dependent shift, guidance embedding, true CFG
        return load_backend("flux", pretrained_model_name_or_path=tiny_flux_paths["dev"], device="cpu",
                            guidance_mode="distilled+cfg")
    return load_backend("instaflow", pretrained_model_name_or_path=tiny_instaflow_path, device="cpu",
                        latent_size=(64, 64))


@pytest.mark.parametrize("algorithm", ["rfds", "rfds_rev"])
@pytest.mark.parametrize("cfg_batched", [True, False])
@pytest.mark.parametrize("seeded", [False, True])
def test_one_deferred_sync_per_step(backend, algorithm, cfg_batched, seeded):
    cond, uncond = random_conds(backend, 2)
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    gen = torch.Generator().manual_seed(1) if seeded else None
    calls = []
    velocity = backend.velocity

    def logged_velocity(*a, **k):
        calls.append("velocity")
        return velocity(*a, **k)

    backend.velocity = logged_velocity
    try:
        with SyncRecorder() as rec:
            checks = DeferredChecks()  # the render's value check joins the step's one sync
            x0 = backend.encode(rgb, generator=gen, checks=checks)
            out = getattr(core, algorithm)(for_latents(backend, x0), x0, cond, uncond, 7.5, cfg_batched=cfg_batched,
                                           generator=gen, checks=checks)
            calls.append("step returned")
            out.loss.backward()
    finally:
        del backend.velocity
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert len(rec.calls) == 1, f"host syncs in the step: {rec.calls}"
    name, where = rec.calls[0]
    assert (name, where.split(":")[0]) == DEFERRED_CHECK and where.endswith("in check")
    assert calls[-1] == "step returned" and calls.count("velocity") >= (1 if cfg_batched else 2)


def test_the_recorder_sees_a_sync_inside_the_package(backend):
    """The recorder is not blind: the eager finiteness check (check_values=True) is recorded."""
    with SyncRecorder() as rec:
        core._check_inputs(torch.zeros(2, 4), None, None, check_values=True)
    assert rec.calls and rec.calls[0][1].startswith("checks.py")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
@pytest.mark.parametrize("algorithm", ["rfds", "rfds_rev"])
def test_one_sync_per_step_on_cuda(tiny_sd3_path, algorithm):
    """On a GPU, CUDA's own sync detector (which also sees syncs inside C++ kernels) counts the
    synchronising calls of a warm step: only the deferred x0 check."""
    import warnings

    backend = load_backend("sd3", pretrained_model_name_or_path=tiny_sd3_path, device="cuda")
    cond, uncond = (({k: v.cuda() for k, v in c.items()}) for c in random_conds(backend, 2))
    rgb = torch.rand(2, 3, 64, 64, device="cuda", requires_grad=True)

    def step():
        checks = DeferredChecks()
        out = getattr(core, algorithm)(backend, backend.encode(rgb, checks=checks), cond, uncond, 7.5, checks=checks)
        out.loss.backward()

    step()  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
