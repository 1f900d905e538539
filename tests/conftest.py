"""Shared fixtures: tiny randomly-initialised models of the real architectures, saved once per
session with ``save_pretrained`` and loaded back through the users' ``from_pretrained`` path."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> str:
    from tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_instaflow_path(tmp_path_factory) -> str:
    from tiny_instaflow import build_tiny_instaflow

    return build_tiny_instaflow(str(tmp_path_factory.mktemp("tiny-instaflow")))
