import os

import pytest
import torch
from factories import save_lab_model

torch.set_num_threads(int(os.environ.get("CREDITRL_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_lab_model_dir(tmp_path_factory):
    """A very small lab-architecture model."""
    return save_lab_model(tmp_path_factory.mktemp("tiny_lab"), hidden=32, layers=2, heads=2, ffn=64)


@pytest.fixture()
def tiny_policy(tiny_lab_model_dir):
    from creditrl.policy.loading import load_policy

    return load_policy(str(tiny_lab_model_dir))
