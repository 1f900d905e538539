"""End to end with FLUX.1: threestudio's own, unchanged ``launch.py --train`` trains a NeRF with every
shipped FLUX config on the CPU with the tiny FLUX.1 [dev] / [schnell] (tests/tiny_flux.py), checked as
the SD3 ones are (tests/test_threestudio_e2e.py ``train_and_check``): exit code 0, ``train/loss_rfds``
finite at every step, the geometry changed between checkpoints, validation and test renders that are not
constant, and a resumed launch that continues the step count while every transformers model load raises
(RFDS_TEST_FORBID_TRANSFORMERS), so its prompts come from the first run's cache.  The 24 GB configs load
the transformer int8-quantised through diffusers' TorchAoConfig, here as on a GPU."""
import os

import pytest

from test_threestudio_e2e import ELSEWHERE, train_and_check
from ts_support import CONFIG_DIR, threestudio_root

pytestmark = [pytest.mark.threestudio, pytest.mark.slow]

FLUX_CONFIGS = {  # config → tiny variant
    "rfds-flux-schnell.yaml": "schnell", "rfds-flux-dev.yaml": "dev",
    "rfds-flux-schnell-low-memory.yaml": "schnell", "rfds-flux-dev-low-memory.yaml": "dev",
}
SPAWN = {"rfds-flux-schnell.yaml", "rfds-flux-dev-low-memory.yaml"}  # threestudio's prompt subprocess


def test_every_flux_config_is_covered():
    assert set(FLUX_CONFIGS) == ELSEWHERE
    assert all(os.path.isfile(os.path.join(CONFIG_DIR, name)) for name in FLUX_CONFIGS)


@pytest.fixture(scope="module")
def root(ts):
    return threestudio_root()


@pytest.mark.parametrize("name", sorted(FLUX_CONFIGS))
def test_launch_trains_resumes_and_tests(tmp_path, root, tiny_flux_paths, name):
    if "low-memory" in name:
        pytest.importorskip("torchao", reason="the 24 GB FLUX configs quantise with torchao (the [test] extra)")
    train_and_check(tmp_path, root, f"custom/threestudio-rfds/configs/{name}", tiny_flux_paths[FLUX_CONFIGS[name]],
                    "loss_rfds", spawn=name in SPAWN)
