"""scripts/device (issue 14's one-call GPU measurement): the phase plan fits the budget and covers
every shipped NeRF config, the training overrides keep the configs' sizes on the GPU, the step log
summary, and the orchestrator's own path on the CPU (models phase only; the whole smoke run,
``OUT=/tmp/smoke-out bash scripts/device/run.sh --cpu-smoke``, takes ~15 min)."""
import json
import os
import sys

import pytest
from omegaconf import OmegaConf

DEVICE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "device")
sys.path.insert(0, DEVICE)

import orchestrate  # noqa: E402
import phases  # noqa: E402
import train  # noqa: E402

NOT_NERF = {"rfds-sd3-refine.yaml", "rfds-sd3-3dgs.yaml"}
# issue 18's configs: no device was lent, so they are not in the device plan yet (FLUX's 12B random weights
# would also need their own models phase)
NOT_PLANNED = {"rfds-flux-schnell.yaml", "rfds-flux-dev.yaml", "rfds-flux-schnell-low-memory.yaml",
               "rfds-flux-dev-low-memory.yaml", "rfds-sd35-large.yaml", "rfds-sd35-large-turbo.yaml"}
# issue 17's Gaussian-splat configs: not NeRF, and not in the device plan either (no device was lent)
NOT_PLANNED |= {"rfds-sd3-gs.yaml", "rfds-rev-sd3-gs.yaml", "rfds-instaflow-gs.yaml", "rfds-flux-schnell-gs.yaml",
                "rfds-flux-dev-gs.yaml"}


def test_plan_covers_every_nerf_config_and_fits_the_budget():
    plan = phases.plan(smoke=False)
    assert len({p.name for p in plan}) == len(plan)
    shipped = {f for f in os.listdir(train.CONFIG_DIR) if f.endswith(".yaml")}
    assert {p.args[0] for p in plan if p.kind == "train"} == shipped - NOT_NERF - NOT_PLANNED
    assert sum(p.min_s for p in plan) < 540  # every phase can start inside the 9-minute budget
    assert [p.name for p in phases.select(plan, "models,train:rfds-sd3")] == \
        ["models", "train:rfds-sd3.yaml", "train:rfds-sd3-low-memory.yaml"]


@pytest.mark.parametrize("config", phases.NERF_CONFIGS)
def test_gpu_overrides_keep_the_configs_sizes(config, tmp_path):
    cfg = OmegaConf.load(os.path.join(train.CONFIG_DIR, config))
    ov = train.overrides(config, "/models/x", 100, str(tmp_path), smoke=False)
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(ov))
    assert merged.data.width == cfg.data.width and merged.system.renderer.num_samples_per_ray == \
        cfg.system.renderer.num_samples_per_ray
    assert merged.system.geometry.pos_encoding_config.otype == "ProgressiveBandFrequency"
    assert merged.trainer.max_steps == 100 and merged.system.guidance.pretrained_model_name_or_path == "/models/x"
    if isinstance(cfg.data.width, type(cfg.data.height)) and OmegaConf.is_list(cfg.data.width):
        assert list(merged.data.resolution_milestones) == [30]


def test_summarize_step_log(tmp_path):
    log = tmp_path / "s.jsonl"
    rows = [{"step": i, "s": 9.0 if i < 3 else 0.5, "height": 256, "peak_gib": 1.0 + i} for i in range(6)]
    rows += [{"step": 6 + i, "s": 9.0 if i < 3 else 1.5, "height": 512, "peak_gib": 2.0} for i in range(5)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train.summarize(str(log)) == {"steps_done": 11, "s_per_it": {"256": 0.5, "512": 1.5}, "peak_gib": 6.0}
    assert train.summarize(str(tmp_path / "none"))["steps_done"] == 0


def test_orchestrator_models_phase_on_cpu(tmp_path):
    out = tmp_path / "out"
    assert orchestrate.main(["--cpu-smoke", "--phases", "models", "--out", str(out), "--work", str(tmp_path / "w")]) == 0
    recs = [json.loads(line) for line in (out / "phases.jsonl").read_text().splitlines()]
    assert recs[0]["phase"] == "env" and recs[0]["smoke"] is True
    assert {"phase": "models", "status": "ok"}.items() <= recs[-1].items()
    assert os.path.isfile(tmp_path / "w" / "models" / "sd3" / "model_index.json")
    assert "== summary" in (out / "summary.txt").read_text()
    assert len(os.listdir(out)) <= 8  # what the device tool brings back
