"""rfds-bench score / report on synthetic renders from the fake launch, with a tiny random CLIP
model built and saved locally (real CLIPModel and CLIP tokenizer classes, no download)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench_fakes import make_fake_threestudio, write_suite
from threestudio_rfds.bench.cli import main as bench_main
from threestudio_rfds.bench.ledger import Ledger
from threestudio_rfds.bench.runner import run_suite
from threestudio_rfds.bench.score import Preprocessor, load_render, pick_views
from threestudio_rfds.bench.suite import load_suite

PROMPTS = ["a hamburger", "a red panda", "FAIL: a broken run"]


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_path):
    return tiny_clip_path


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ts = make_fake_threestudio(str(root / "threestudio"))
    out = str(root / "out")
    suite = load_suite(write_suite(str(root / "s.yaml"), PROMPTS, seeds=[0, 1]))
    run_suite(suite, ts, out, log=lambda s: None)
    return out


def test_score_matches_clip_forward(results, tiny_clip):
    from transformers import CLIPModel

    from tiny_instaflow import tiny_clip_tokenizer

    assert bench_main(["score", results, "--clip-model", tiny_clip, "--device", "cpu"]) == 0
    with open(os.path.join(results, "scores.json")) as f:
        s = json.load(f)
    assert set(s["runs"]) and len(s["runs"]) == 4  # 2 prompts × 2 seeds; the failed runs are not scored
    assert s["r_precision_informative"] and s["prompts"] == PROMPTS

    # independent check of one run: CLIPModel's own logits_per_image = scale · cos
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = tiny_clip_tokenizer()
    pre = Preprocessor(24, 24)
    rid, run = sorted(s["runs"].items())[0]
    files = [os.path.join(results, v["file"]) for v in run["views"]]
    px = torch.from_numpy(np.stack([pre(load_render(f)) for f in files]))
    ids = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=px).logits_per_image
    cos = (logits / model.logit_scale.exp()).detach().numpy()
    true = PROMPTS.index(run["prompt"])
    np.testing.assert_allclose([v["cosine"] for v in run["views"]], cos[:, true], atol=1e-5)
    np.testing.assert_allclose(run["clip_score"], np.mean(100 * np.maximum(cos[:, true], 0)), atol=1e-3)
    np.testing.assert_allclose(run["r_precision"], np.mean(cos.argmax(1) == true))
    assert run["n_views"] == 4


def test_report_tables_and_plots(results, tiny_clip):
    if not os.path.exists(os.path.join(results, "scores.json")):
        bench_main(["score", results, "--clip-model", tiny_clip, "--device", "cpu"])
    assert bench_main(["report", results]) == 0
    md = open(os.path.join(results, "report.md")).read()
    with open(os.path.join(results, "scores.json")) as f:
        runs = json.load(f)["runs"]
    ham = np.mean([r["clip_score"] for r in runs.values() if r["prompt"] == "a hamburger"])
    assert f"| a hamburger | fake | 2 | {ham:.2f} |" in md
    assert "| a red panda | fake | 2 |" in md
    assert "## Failed runs" in md
    assert md.count("| exit code 1: RuntimeError: fake launch failed for FAIL: a broken run |") == 2  # the cause, not just the code
    assert "4 runs done, 2 failed" in md
    for name in ("score_per_prompt.png", "score_vs_time.png", "gpu_timeline.png"):
        with Image.open(os.path.join(results, "plots", name)) as im:
            ink = np.nonzero((np.asarray(im.convert("L")) < 250).any(axis=0))[0]  # columns with something drawn
            assert im.size[0] > 100 and im.size[0] - 1 - ink.max() < 0.05 * im.size[0], (name, im.size, ink.max())


def test_report_before_scoring(tmp_path):
    ts = make_fake_threestudio(str(tmp_path / "ts"))
    out = str(tmp_path / "out")
    run_suite(load_suite(write_suite(str(tmp_path / "s.yaml"), ["a cat"])), ts, out, log=lambda s: None)
    assert bench_main(["report", out]) == 0
    assert "Not scored yet" in open(os.path.join(out, "report.md")).read()
    assert bench_main(["report", str(tmp_path)]) == 2  # not a results folder


def test_first_square_panel_and_view_subsampling(tmp_path):
    grid = np.concatenate([np.full((8, 8, 3), [255, 0, 0], np.uint8), np.zeros((8, 16, 3), np.uint8)], 1)
    Image.fromarray(grid).save(tmp_path / "g.png")
    assert np.asarray(load_render(str(tmp_path / "g.png"))).tolist() == np.full((8, 8, 3), [255, 0, 0]).tolist()
    assert load_render(str(tmp_path / "g.png"), "full").size == (24, 8)
    with pytest.raises(ValueError, match="panel must be one of"):
        load_render(str(tmp_path / "g.png"), "left")
    assert pick_views(120, 4) == [0, 30, 60, 90] and pick_views(3, 10) == [0, 1, 2]


def test_missing_clip_model_error(results, capsys):
    assert bench_main(["score", results, "--clip-model", "/nonexistent/clip", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rfds-bench: error: cannot load CLIP model '/nonexistent/clip'") and err.count("\n") == 1


def test_score_a_moved_copy_with_a_truncated_render(results, tiny_clip, tmp_path, capsys):
    """Ledger and scores.json paths are relative to the results folder: a copy scores its own files, also
    after it is moved; an unreadable render is skipped with a message and the other views are scored."""
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(results, copy)
    moved = str(tmp_path / "moved")
    os.rename(copy, moved)
    state = {k: v for k, v in Ledger(os.path.join(moved, "ledger.jsonl")).state().items() if v["status"] == "done"}
    rid, rec = sorted(state.items())[0]
    bad = os.path.join(moved, rec["renders_dir"], rec["renders"][1])
    with open(bad, "r+b") as f:
        f.truncate(40)  # a render cut off mid-write
    assert bench_main(["score", moved, "--clip-model", tiny_clip, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{rid}: skipping 1 unreadable render(s) of 4" in out
    with open(os.path.join(moved, "scores.json")) as f:
        runs = json.load(f)["runs"]
    assert len(runs) == 4 and runs[rid]["n_views"] == 3 and runs[rid]["n_unreadable"] == 1
    assert all(not os.path.isabs(v["file"]) and os.path.exists(os.path.join(moved, v["file"]))
               for r in runs.values() for v in r["views"])


def test_legacy_absolute_paths_are_rerooted(tmp_path):
    from threestudio_rfds.bench.paths import local_path

    out = str(tmp_path / "new")
    assert local_path(out, "/old/place/runs/fake/tag-s0/save/it10-test") == os.path.join(out, "runs/fake/tag-s0/save/it10-test")
    assert local_path(out, "/old/place/logs/fake/tag-s0.log") == os.path.join(out, "logs/fake/tag-s0.log")
    assert local_path(out, "runs/fake/t") == os.path.join(out, "runs/fake/t")


def test_report_gpu_utilisation_and_minutes():
    from threestudio_rfds.bench.report import fmt_minutes, gpu_usage

    a = [{"gpu": "gpu0", "session": "s1", "start": 0, "end": 60, "status": "done"},
         {"gpu": "gpu0", "session": "s1", "start": 60, "end": 100, "status": "failed"},
         {"gpu": "gpu1", "session": "s1", "start": 0, "end": 30, "status": "done"},
         {"gpu": "gpu1", "session": "s2", "start": 1000, "end": 1010, "status": "done"}]
    g0, g1 = gpu_usage(a)
    assert (g0["runs"], g0["done"], g0["busy_s"], g0["idle_s"]) == (2, 1, 100, 0)
    assert (g1["runs"], g1["busy_s"], g1["idle_s"]) == (2, 40, 70)  # idle while session s1 ran; s2 fully busy
    assert abs(g1["utilisation"] - 40 / 110) < 1e-9
    assert [fmt_minutes(s) for s in (0.8, 15, 150, 1500, None)] == ["0.013", "0.25", "2.5", "25.0", "–"]


def test_report_names_points_and_gpus(results, tiny_clip):
    if not os.path.exists(os.path.join(results, "scores.json")):
        bench_main(["score", results, "--clip-model", tiny_clip, "--device", "cpu"])
    assert bench_main(["report", results]) == 0
    md = open(os.path.join(results, "report.md")).read()
    assert "| 1 | a hamburger | fake | 2 |" in md and "## GPU utilisation" in md and "| gpu0 | 6 | 4 |" in md
    assert os.path.exists(os.path.join(results, "plots", "gpu_timeline.png"))


def test_prompts_the_tokenizer_merges_are_one_class(tmp_path, tiny_clip, capsys):
    """Prompts that differ only past CLIP's 77 tokens have one text embedding: R-precision cannot tell them
    apart, so they are scored as one class (a tie used to count as a miss for the second), with a line saying so."""
    long = "a photo of " + "a very " * 20 + "detailed "
    prompts = [long + "cat", long + "dog", "a red panda"]
    ts = make_fake_threestudio(str(tmp_path / "ts"))
    out = str(tmp_path / "out")
    run_suite(load_suite(write_suite(str(tmp_path / "s.yaml"), prompts)), ts, out, log=lambda s: None)
    capsys.readouterr()
    assert bench_main(["score", out, "--clip-model", tiny_clip, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "tokenise identically" in text and "one class" in text, text
    with open(os.path.join(out, "scores.json")) as f:
        s = json.load(f)
    assert s["prompt_classes"] == [0, 0, 2] and s["r_precision_informative"]
    second = [r for r in s["runs"].values() if r["prompt"] == prompts[1]][0]
    assert any(v["top1"] == 0 for v in second["views"]) and second["r_precision"] > 0  # a tie goes to prompt 0: a hit
    for r in s["runs"].values():
        same = {0, 1} if r["prompt"] in prompts[:2] else {2}
        assert all(v["r_precision"] == float(v["top1"] in same) for v in r["views"]), r
