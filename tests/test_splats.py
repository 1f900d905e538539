"""The threestudio-free splat modules (threestudio_rfds.splats): the 3DGS PLY file, point clouds,
initialisation, cameras, the density field and the OBJ writer.  No gsplat or threestudio needed."""
import math
import os

import numpy as np
import pytest
import torch

from full_disk import fill
from threestudio_rfds.splats import cameras, density, obj, params, ply

plyfile = pytest.importorskip("plyfile", reason="plyfile (test extra) parses the PLY independently")


def random_splats(n=7, degree=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = params.num_sh_bases(degree)
    return {"means": torch.randn(n, 3, generator=g), "scales": torch.randn(n, 3, generator=g) - 2,
            "quats": torch.randn(n, 4, generator=g), "opacities": torch.randn(n, generator=g),
            "sh0": torch.randn(n, 1, 3, generator=g), "shN": torch.randn(n, k - 1, 3, generator=g)}


def test_ply_has_the_3dgs_layout_and_round_trips(tmp_path):
    s = random_splats()
    path = ply.write_splat_ply(str(tmp_path / "g.ply"), s)
    data = plyfile.PlyData.read(path)
    v = data["vertex"]
    names = [p.name for p in v.properties]
    assert names == (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
                     + [f"f_rest_{i}" for i in range(24)]
                     + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert all(p.val_dtype in ("f4", "float32") for p in v.properties) and data.byte_order == "<"
    assert np.allclose(np.stack([v["x"], v["y"], v["z"]], 1), s["means"].numpy())
    assert np.array_equal(np.stack([v["nx"], v["ny"], v["nz"]], 1), np.zeros((7, 3), np.float32))
    # f_rest is channel-major: f_rest_0..7 are the red coefficients 1..8
    assert np.allclose(np.stack([v[f"f_rest_{i}"] for i in range(8)], 1), s["shN"][:, :, 0].numpy())
    assert np.allclose(v["opacity"], s["opacities"].numpy())
    back = ply.read_splat_ply(path)
    assert all(torch.equal(back[k], s[k]) for k in s) and ply.sh_degree_of(back) == 2


def test_ply_matches_gsplats_exporter_bytes(tmp_path):
    """Our rows equal gsplat's ``splat2ply_bytes`` rows once its missing normals are put in."""
    exporter = pytest.importorskip("gsplat.exporter", reason="gsplat not installed")
    s = random_splats(n=5, degree=1)
    ours = plyfile.PlyData.read(ply.write_splat_ply(str(tmp_path / "a.ply"), s))["vertex"]
    theirs_bytes = exporter.splat2ply_bytes(s["means"], s["scales"], s["quats"], s["opacities"], s["sh0"][:, 0],
                                            s["shN"].permute(0, 2, 1).reshape(5, -1))
    (tmp_path / "b.ply").write_bytes(theirs_bytes)
    theirs = plyfile.PlyData.read(str(tmp_path / "b.ply"))["vertex"]
    for p in theirs.properties:
        assert np.array_equal(ours[p.name], theirs[p.name]), p.name


def test_ply_refuses_bad_splats_and_paths_leaving_nothing(tmp_path):
    s = random_splats()
    s["scales"][3, 1] = float("nan")
    with pytest.raises(ply.PlyError, match="1 of 7 splats hold NaN/inf"):
        ply.write_splat_ply(str(tmp_path / "g.ply"), s)
    with pytest.raises(ply.PlyError, match="is a folder"):
        ply.write_splat_ply(str(tmp_path), random_splats())
    with pytest.raises(ply.PlyError, match="does not exist"):
        ply.write_splat_ply(str(tmp_path / "no" / "g.ply"), random_splats())
    bad = random_splats()
    bad["sh0"] = bad["sh0"][:, 0]
    with pytest.raises(ply.PlyError, match=r"splats\['sh0'\] has shape \(7, 3\), expected \(7, 1, 3\)"):
        ply.write_splat_ply(str(tmp_path / "g.ply"), bad)
    assert os.listdir(tmp_path) == []


def test_ply_on_a_full_disk_keeps_the_old_file(tmpfs, monkeypatch):
    old = ply.write_splat_ply(str(tmpfs / "g.ply"), random_splats(n=2))
    before = open(old, "rb").read()
    fill(tmpfs)
    with pytest.raises(ply.PlyError, match="cannot write PLY .* disk has .* free"):
        ply.write_splat_ply(old, random_splats(n=500))
    # a disk that fills up while writing: the free-space check is told there is room, the real write fails
    monkeypatch.setattr(ply.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 40})())
    with pytest.raises(ply.PlyError, match="No space left on device; any earlier file there is unchanged"):
        ply.write_splat_ply(old, random_splats(n=500))
    assert open(old, "rb").read() == before
    assert sorted(os.listdir(tmpfs)) == ["filler", "g.ply"]


def write_ascii_ply(path, xyz, rgb):
    lines = ["ply", "format ascii 1.0", "comment made by a test", f"element vertex {len(xyz)}",
             "property float x", "property float y", "property float z",
             "property uchar red", "property uchar green", "property uchar blue", "element face 0",
             "property list uchar int vertex_indices", "end_header"]
    lines += [f"{a} {b} {c} {r} {g} {bb}" for (a, b, c), (r, g, bb) in zip(xyz.tolist(), rgb.tolist())]
    path.write_text("\n".join(lines) + "\n")


def test_point_clouds_from_ply_ascii_binary_and_numpy(tmp_path):
    xyz = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    rgb = np.arange(18, dtype=np.uint8).reshape(6, 3) * 10
    write_ascii_ply(tmp_path / "a.ply", xyz, rgb)
    p, c = ply.read_point_cloud(str(tmp_path / "a.ply"))
    assert torch.allclose(p, torch.from_numpy(xyz), atol=1e-6) and torch.allclose(c * 255, torch.from_numpy(rgb).float())
    el = plyfile.PlyElement.describe(np.array([tuple(r) for r in xyz], dtype=[("x", ">f4"), ("y", ">f4"), ("z", ">f4")]),
                                     "vertex")
    plyfile.PlyData([el], byte_order=">").write(str(tmp_path / "b.ply"))
    p, c = ply.read_point_cloud(str(tmp_path / "b.ply"))
    assert torch.equal(p, torch.from_numpy(xyz)) and c is None
    np.save(tmp_path / "c.npy", np.concatenate([xyz, rgb / 255.0], 1))
    p, c = ply.read_point_cloud(str(tmp_path / "c.npy"))
    assert p.shape == (6, 3) and torch.allclose(c * 255, torch.from_numpy(rgb).float(), atol=1e-4)
    np.savez(tmp_path / "d.npz", xyz=xyz)
    with pytest.raises(ply.PlyError, match="must be named 'points'"):
        ply.read_point_cloud(str(tmp_path / "d.npz"))
    with pytest.raises(ply.PlyError, match="does not exist"):
        ply.read_point_cloud(str(tmp_path / "none.ply"))
    (tmp_path / "e.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n"
                                     b"property float y\nproperty float z\nend_header\n" + b"\0" * 20)
    with pytest.raises(ply.PlyError, match="truncated: 1 of 3 vertices"):
        ply.read_point_cloud(str(tmp_path / "e.ply"))


def test_initialisation_from_points():
    g = torch.Generator().manual_seed(1)
    xyz = params.points_in_ball(500, 0.8, generator=g)
    assert xyz.norm(dim=1).max() <= 0.8 and xyz.norm(dim=1).min() < 0.3
    s = params.splats_from_points(xyz[:50], torch.full((50, 3), 0.25), sh_degree=3, opacity=0.2)
    assert s["shN"].shape == (50, 15, 3) and torch.allclose(torch.sigmoid(s["opacities"]), torch.tensor(0.2))
    assert torch.allclose(params.sh0_to_rgb(s["sh0"]), torch.tensor(0.25))
    d = torch.cdist(xyz[:50], xyz[:50]) + torch.eye(50) * 1e9  # brute-force 3-NN distance
    assert torch.allclose(s["scales"][:, 0].exp(), d.topk(3, largest=False).values.mean(1), rtol=1e-5)
    assert torch.equal(s["quats"], torch.tensor([[1.0, 0, 0, 0]]).expand(50, 4))
    with pytest.raises(ValueError, match=r"points must have shape \[N, 3\]"):
        params.splats_from_points(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="opacity must be a number in"):
        params.splats_from_points(xyz, opacity=1.0)


def look_at_c2w(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)):
    """OpenGL camera-to-world (threestudio's): columns right, up, back (= −forward), eye."""
    eye, target, up = map(torch.tensor, (eye, target, up))
    fwd = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(fwd, up)
    right = right / right.norm()
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, torch.linalg.cross(right, fwd), -fwd, eye
    return c2w


def test_cameras_project_a_point_to_the_pixel_whose_ray_hits_it():
    """threestudio's ray through pixel (i, j) of an H×W image: d = ((i+½−W/2)/f, −(j+½−H/2)/f, −1)
    in camera axes, rotated by c2w.  A point on that ray must project to (i+½, j+½)."""
    c2w = look_at_c2w((2.0, 1.0, 0.5))
    fovy, W, H = torch.tensor([math.radians(60.0)]), 48, 32
    f = 0.5 * H / math.tan(0.5 * fovy.item())
    i, j = 30, 7
    d_cam = torch.tensor([(i + 0.5 - W / 2) / f, -(j + 0.5 - H / 2) / f, -1.0])
    point = c2w[:3, 3] + 1.7 * (c2w[:3, :3] @ d_cam)
    view = cameras.viewmats_from_c2w(c2w[None])[0]
    K = cameras.intrinsics_from_fovy(fovy, W, H)[0]
    p_cam = view[:3, :3] @ point + view[:3, 3]
    assert torch.isclose(p_cam[2], torch.tensor(1.7), atol=1e-5)  # OpenCV: +z in front, depth = 1.7
    uv = (K @ p_cam)[:2] / p_cam[2]
    assert torch.allclose(uv, torch.tensor([i + 0.5, j + 0.5]), atol=1e-4)
    assert torch.allclose(cameras.viewmats_from_c2w(c2w[None, :3]), view[None])
    with pytest.raises(ValueError, match=r"c2w must have shape \[B, 4, 4\]"):
        cameras.viewmats_from_c2w(c2w)


def test_density_equals_the_sum_of_gaussians():
    s = random_splats(n=9, degree=0, seed=3)
    s["scales"] = s["scales"] * 0.3 - 0.5
    pts = torch.randn(50, 3)
    rho, rgb = density.splat_density(pts, s, point_chunk=7, splat_chunk=4)
    R = density.quat_to_rotmat(s["quats"])
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3).expand(9, 3, 3), atol=1e-5)
    cov = R @ torch.diag_embed(torch.exp(2 * s["scales"])) @ R.transpose(1, 2)
    d = pts[:, None] - s["means"][None]
    m2 = torch.einsum("msi,sij,msj->ms", d, torch.linalg.inv(cov), d)
    w = torch.sigmoid(s["opacities"]) * torch.exp(-0.5 * m2) * (m2 < 9)
    assert torch.allclose(rho, w.sum(1), atol=1e-5)
    ref_rgb = (w @ params.sh0_to_rgb(s["sh0"][:, 0]).clamp(0, 1)) / w.sum(1, keepdim=True).clamp_min(1e-12)
    assert torch.allclose(rgb, ref_rgb, atol=1e-4)
    g = density.grid_points(1.0, 3)
    assert g.shape == (27, 3) and torch.equal(g[1], torch.tensor([-1.0, -1.0, 0.0]))


def test_obj_writer(tmp_path):
    v, f = torch.rand(4, 3), torch.tensor([[0, 1, 2], [0, 2, 3]])
    path = obj.write_obj(str(tmp_path / "m.obj"), v, f, torch.rand(4, 3))
    lines = open(path).read().splitlines()
    assert len(lines) == 6 and lines[0].startswith("v ") and len(lines[0].split()) == 7 and lines[4] == "f 1 2 3"
    with pytest.raises(ValueError, match=r"face indices must lie in \[0, 3\]"):
        obj.write_obj(str(tmp_path / "n.obj"), v, f + 2)
    assert not (tmp_path / "n.obj").exists()
