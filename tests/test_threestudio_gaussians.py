"""The Gaussian-splat path's threestudio classes (rfds-gaussians, rfds-gsplat-renderer,
rfds-gaussian-system's strategy plumbing, rfds-gaussian-exporter) against real threestudio, with
gsplat's real Python code over the test-only torch stand-in for its CUDA kernels
(tests/gsplat_torch.py).  End-to-end training through launch.py: test_threestudio_e2e_gs.py."""
import math

import numpy as np
import pytest
import torch

from ts_support import camera_batch

pytestmark = [pytest.mark.threestudio]


@pytest.fixture(scope="module")
def gs(ts):
    """gsplat with the torch stand-in installed (never its JIT CUDA build)."""
    pytest.importorskip("gsplat", reason="gsplat is a test extra (pip install -e '.[test]')")
    import gsplat_torch

    gsplat_torch.install()
    import gsplat

    return gsplat


def geometry(ts, **cfg):
    return ts.find("rfds-gaussians")({"num_gaussians": 64, **cfg})


# ------------------------------------------------------------------------------------- geometry
def test_geometry_initialisations(ts, tmp_path):
    from threestudio_rfds.splats.ply import write_splat_ply

    torch.manual_seed(0)
    g = geometry(ts, init_radius=0.4, sh_degree=1)
    assert g.num_gaussians == 64 and g.splats["shN"].shape == (64, 3, 3)
    assert g.splats["means"].norm(dim=1).max() <= 0.4
    assert {n for n, _ in g.named_parameters()} == {f"splats.{k}" for k in
                                                    ("means", "scales", "quats", "opacities", "sh0", "shN")}
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).uniform(-0.5, 0.5, (10, 6)).astype(np.float32))
    p = geometry(ts, init="point-cloud", init_path=str(tmp_path / "pts.npy"))
    assert p.num_gaussians == 10
    write_splat_ply(str(tmp_path / "g.ply"), g.tensors())
    back = geometry(ts, init="splats", init_path=str(tmp_path / "g.ply"), sh_degree=1)
    assert all(torch.equal(back.splats[k], g.splats[k]) for k in back.splats)
    with pytest.raises(ValueError, match="has SH degree 1, geometry.sh_degree is 0"):
        geometry(ts, init="splats", init_path=str(tmp_path / "g.ply"))
    with pytest.raises(ValueError, match="geometry.init must be one of"):
        geometry(ts, init="cube")
    with pytest.raises(ValueError, match="needs geometry.init_path"):
        geometry(ts, init="point-cloud")
    with pytest.raises(ValueError, match=r"rfds-gaussians: unknown config key 'num_points' \(allowed: .*num_gaussians"):
        ts.find("rfds-gaussians")({"num_points": 8})


def test_geometry_loads_a_state_dict_of_another_size_in_place(ts):
    """A checkpoint after densification has more splats: the same Parameter objects are resized,
    so an optimizer built on them stays valid; a different SH degree is refused."""
    small, big = geometry(ts, num_gaussians=8), geometry(ts, num_gaussians=20)
    before = {k: id(v) for k, v in small.splats.items()}
    small.load_state_dict(big.state_dict())
    assert small.num_gaussians == 20 and {k: id(v) for k, v in small.splats.items()} == before
    assert all(torch.equal(small.splats[k], big.splats[k]) for k in big.splats)
    with pytest.raises(ValueError, match="sh_degree differs"):
        small.load_state_dict(geometry(ts, sh_degree=2).state_dict())


# ------------------------------------------------------------------------------ strategies
def test_strategies_are_gsplats_own_and_checked(ts, gs):
    from threestudio_rfds.adapter.gaussians.strategy import make_strategy

    blocks = {"default": {"refine_every": 7}, "mcmc": {"cap_max": 99}}
    assert type(make_strategy("default", blocks)) is gs.DefaultStrategy and make_strategy("default", blocks).refine_every == 7
    assert make_strategy("mcmc", blocks).cap_max == 99 and make_strategy("mcmc", {}).cap_max == 1_000_000
    with pytest.raises(ValueError, match=r"system.strategy_type must be one of \['default', 'mcmc'\], got 'adc'"):
        make_strategy("adc", {})
    with pytest.raises(ValueError, match=r"system.strategy.default \(DefaultStrategy\): unknown config key 'densify_every'"):
        make_strategy("default", {"default": {"densify_every": 100}})
    with pytest.raises(ValueError, match=r"system.strategy: unknown config key 'refine_every' \(allowed: default, mcmc\)"):
        make_strategy("default", {"refine_every": 100})


def test_group_views_let_gsplat_densify_inside_one_optimizer(ts, gs):
    """gsplat's own duplicate/remove ops, through the views, resize the parameters of the one
    shared Adam and its moments; the optimizer then steps on the new parameters."""
    from gsplat.strategy.ops import duplicate, remove

    from threestudio_rfds.adapter.gaussians.strategy import check_splat_groups, splat_group_views

    g = geometry(ts, num_gaussians=6)
    opt = torch.optim.Adam([{"params": [p], "name": f"geometry.splats.{k}", "lr": 0.1} for k, p in g.splats.items()])
    sum(p.sum() for p in g.splats.values()).backward()
    opt.step()
    check_splat_groups(opt, g.tensors())
    state = {"grad2d": torch.arange(6.0)}
    duplicate(g.splats, splat_group_views(opt), state, torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool))
    assert g.num_gaussians == 8 and state["grad2d"].tolist() == [0, 1, 2, 3, 4, 5, 0, 3]
    for k, p in g.splats.items():
        group = next(gr for gr in opt.param_groups if gr["name"] == f"geometry.splats.{k}")
        assert group["params"] == [p] and opt.state[p]["exp_avg"].shape == p.shape
        assert torch.equal(opt.state[p]["exp_avg"][6:], torch.zeros_like(p[6:]))  # new splats: fresh moments
    remove(g.splats, splat_group_views(opt), state, torch.arange(8) < 3)
    assert g.num_gaussians == 5
    opt.zero_grad()
    sum(p.sum() for p in g.splats.values()).backward()
    opt.step()
    with pytest.raises(ValueError, match=r"must give each splat parameter its own entry; missing \['geometry.splats.shN'\]"):
        check_splat_groups(torch.optim.Adam([{"params": [g.splats[k]], "name": f"geometry.splats.{k}"}
                                             for k in ("means", "scales", "quats", "opacities", "sh0")]), g.tensors())


# ------------------------------------------------------------------------------- renderer
def test_renderer_puts_a_splat_where_threestudios_camera_projects_it(ts, gs):
    """A small opaque splat at a point: the peak of the rendered opacity lies at the pixel that
    threestudio's own mvp matrix (the nvdiffrast convention of its batch) projects the point to,
    its depth is the camera-axis distance, and comp_rgb = fg + (1 − opacity)·background."""
    torch.manual_seed(3)
    batch = camera_batch(ts, {"batch_size": 2, "width": 48, "height": 40, "camera_distance_range": [2.0, 2.0],
                              "elevation_range": [-10, 40]})
    g = geometry(ts, num_gaussians=1)
    point = torch.tensor([0.15, -0.1, 0.2])
    with torch.no_grad():
        g.splats["means"].copy_(point[None])
        g.splats["scales"].fill_(math.log(0.01))
        g.splats["opacities"].fill_(6.0)
    bg = ts.find("solid-color-background")({"color": [0.2, 0.4, 0.6]})
    renderer = ts.find("rfds-gsplat-renderer")({}, geometry=g, material=None, background=bg)
    out = renderer(**batch)
    assert out["comp_rgb"].shape == (2, 40, 48, 3) and out["opacity"].shape == (2, 40, 48, 1)
    clip = batch["mvp_mtx"] @ torch.cat([point, torch.ones(1)])
    ndc = clip[:, :2] / clip[:, 3:]
    expected = torch.stack([(ndc[:, 0] + 1) / 2 * 48, (ndc[:, 1] + 1) / 2 * 40], 1)  # (u, v) in pixels
    for b in range(2):
        alpha = out["opacity"][b, :, :, 0]
        v, u = divmod(int(alpha.argmax()), 48)
        assert abs(u + 0.5 - expected[b, 0]) <= 1.0 and abs(v + 0.5 - expected[b, 1]) <= 1.0, (u, v, expected[b])
        cam = torch.linalg.inv(batch["c2w"][b]) @ torch.cat([point, torch.ones(1)])
        assert torch.isclose(out["depth"][b, v, u, 0], -cam[2], rtol=1e-3)  # OpenGL camera looks down −z
    assert torch.allclose(out["comp_rgb"], out["comp_rgb_fg"] + (1 - out["opacity"]) * out["comp_rgb_bg"])
    assert torch.allclose(out["comp_rgb_bg"], torch.tensor([0.2, 0.4, 0.6]).expand(2, 40, 48, 3))
    out["comp_rgb"].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in g.splats.values())
    with pytest.raises(ValueError, match="renderer.rasterize_mode must be one of"):
        ts.find("rfds-gsplat-renderer")({"rasterize_mode": "fast"}, geometry=g, material=None, background=bg)


# ------------------------------------------------------------------------------- exporter
def test_mesh_export_is_the_density_level_set(ts, tmp_path):
    """One isotropic splat (σ = 0.3, opacity 0.99): ρ(x) = 0.99·exp(−|x|²/2σ²) = 0.5 on the sphere of
    radius σ·√(2 ln 1.98); the mesh's vertices lie there and carry the splat's colour."""
    from threestudio_rfds.splats.params import rgb_to_sh0

    g = geometry(ts, num_gaussians=1, radius=1.0)
    with torch.no_grad():
        g.splats["means"].zero_()
        g.splats["scales"].fill_(math.log(0.3))
        g.splats["opacities"].fill_(math.log(0.99 / 0.01))
        g.splats["sh0"].copy_(rgb_to_sh0(torch.tensor([0.9, 0.5, 0.1]))[None, None])
    exporter = ts.find("rfds-gaussian-exporter")({"mesh": True, "mesh_resolution": 48}, geometry=g,
                                                  material=None, background=None)
    outs = exporter()
    assert [o.save_type for o in outs] == ["splat_ply", "vertex_color_obj"]
    mesh = outs[1].params
    r = mesh["vertices"].norm(dim=1)
    expected = 0.3 * math.sqrt(2 * math.log(1.98))
    assert mesh["faces"].shape[0] > 100 and (r - expected).abs().max() < 2 / 47, (r.min(), r.max(), expected)
    assert torch.allclose(mesh["colors"], torch.tensor([0.9, 0.5, 0.1]).expand_as(mesh["colors"]), atol=1e-4)
    with pytest.raises(ValueError, match="never reaches exporter.mesh_threshold 2.0"):
        ts.find("rfds-gaussian-exporter")({"mesh": True, "mesh_threshold": 2.0, "mesh_resolution": 8},
                                          geometry=g, material=None, background=None)()
    with pytest.raises(ValueError, match="rfds-gaussian-exporter: unknown config key 'format'"):
        ts.find("rfds-gaussian-exporter")({"format": "splat"}, geometry=g, material=None, background=None)


# ------------------------------------------------------------------------- every guidance
GUIDANCE_TYPES = {"rfds-sd3-guidance": "sd3", "rfds-rev-sd3-guidance": "sd3", "rfds-instaflow-guidance": "instaflow",
                  "rfds-rev-instaflow-guidance": "instaflow", "RFDS-sd3": "sd3", "RFDS-Rev-sd3": "sd3",
                  "RFDS-Rev": "instaflow"}
PROCESSORS = {"sd3": "rfds-sd3-prompt-processor", "instaflow": "rfds-instaflow-prompt-processor"}


@pytest.fixture(scope="module")
def gs_system(ts, gs, workdir, tiny_sd3_path):
    """rfds-gaussian-system built from the shipped rfds-sd3-gs.yaml (tiny sizes), outside a trainer."""
    from threestudio.utils.config import load_config

    from ts_support import CONFIG_DIR

    cfg = load_config(f"{CONFIG_DIR}/rfds-sd3-gs.yaml", cli_args=[
        "system.prompt_processor.prompt=a cat", f"system.guidance.pretrained_model_name_or_path={tiny_sd3_path}",
        "system.geometry.num_gaussians=128", "data.batch_size=2", "data.width=32", "data.height=32"])
    torch.manual_seed(0)
    system = ts.find(cfg.system_type)(cfg.system)
    with torch.no_grad():  # anisotropic: an isotropic splat's rotation has no gradient (R σ²I Rᵀ = σ²I)
        system.geometry.splats["scales"].add_(0.3 * torch.randn_like(system.geometry.splats["scales"]))
    return system, cfg


@pytest.mark.parametrize("kind", sorted(GUIDANCE_TYPES))
def test_every_guidance_drives_the_splats(ts, gs_system, workdir, tiny_sd3_path, tiny_instaflow_path, kind):
    """The system's loss (Σ λ·loss_* + regularisers) from each guidance type of this extension,
    with view-dependent prompts, backpropagates through gsplat into every splat parameter."""
    system, cfg = gs_system
    family = GUIDANCE_TYPES[kind]
    path = tiny_sd3_path if family == "sd3" else tiny_instaflow_path
    extra = {"latent_size": [64, 64]} if family == "instaflow" else {}
    if kind == "RFDS-Rev":
        extra.update(unet_delta=None, vae_path=None)
    guidance = ts.find(kind)({"pretrained_model_name_or_path": path, "seed": 0, "dtype": "fp32", **extra})
    prompts = ts.find(PROCESSORS[family])({"pretrained_model_name_or_path": path, "prompt": "a cat", "spawn": False,
                                           "negative_prompt": "blurry"})()
    batch = camera_batch(ts, {"batch_size": 2, "width": 32, "height": 32, "elevation_range": [-10, 80]})
    system.cfg.loss["lambda_rfds_rev"] = 1.0  # the RFDS-Rev alias returns loss_rfds_rev
    for p in system.geometry.splats.values():
        p.grad = None
    out = system(batch)
    guidance_out = guidance(out["comp_rgb"], prompts, **batch, rgb_as_latents=False)
    loss = system.loss(out, guidance_out)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    for name, p in system.geometry.splats.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "shN":  # sh_degree 0: no higher-order colour
            assert p.grad.abs().sum() > 0, name
    del system.cfg.loss["lambda_rfds_rev"]
    with pytest.raises(ValueError, match="the guidance returns loss_rfds_rev; set system.loss.lambda_rfds_rev"):
        system.loss(out, {"loss_rfds_rev": loss.detach()})


def test_system_bad_config_is_refused_before_any_model_loads(ts, gs, workdir, tmp_path):
    """Unknown keys (system, strategy), an unknown strategy, a missing splat group: one line each,
    raised while the system is built — the guidance's models load only at fit start."""
    from threestudio.utils.config import load_config

    from threestudio_rfds.adapter.config_keys import UnknownConfigKeyError
    from ts_support import CONFIG_DIR

    def build(*args):
        cfg = load_config(f"{CONFIG_DIR}/rfds-sd3-gs.yaml", cli_args=["system.prompt_processor.prompt=a cat", *args])
        return ts.find(cfg.system_type)(cfg.system)

    with pytest.raises(UnknownConfigKeyError, match=r"^rfds-gaussian-system: unknown config key 'densify' \(allowed: "):
        build("system.densify=true")
    with pytest.raises(ValueError, match=r"^system.strategy_type must be one of \['default', 'mcmc'\], got 'inria'$"):
        build("system.strategy_type=inria")
    with pytest.raises(UnknownConfigKeyError, match=r"^system.strategy.mcmc \(MCMCStrategy\): unknown config key 'grow_grad2d'"):
        build("system.strategy_type=mcmc", "system.strategy.mcmc.grow_grad2d=0.1")
    assert type(build("system.strategy_type=mcmc").strategy).__name__ == "MCMCStrategy"  # one override switches
    with pytest.raises(UnknownConfigKeyError, match="^rfds-gsplat-renderer: unknown config key 'tile'"):
        build("system.renderer.tile=8")
    system = build()
    system.set_save_dir(str(tmp_path))
    (tmp_path / "it5-export").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="export folder .*it5-export' exists and is not a folder"):
        system.export_dir(5)
    assert system.export_dir(6).endswith("it6-export")
