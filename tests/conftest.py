import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CREDITRL_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_lab_model_dir(tmp_path_factory):
    """A randomly initialised, very small lab-architecture model saved as a normal model folder."""
    from creditrl.lab.model import new_lab_model
    from creditrl.lab.tokenizer import build_char_tokenizer

    folder = tmp_path_factory.mktemp("tiny_lab")
    new_lab_model(seed=0, hidden=32, layers=2, heads=2, ffn=64).save_pretrained(folder)
    build_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_policy(tiny_lab_model_dir):
    from creditrl.policy.loading import load_policy

    return load_policy(str(tiny_lab_model_dir))
