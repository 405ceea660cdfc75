"""Scoring through torch.compile (`model.compile`): eager's numbers, and one graph for every bucket shape."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend

import creditrl.policy.transformers_backend as backend
from creditrl.policy.loading import load_policy

pytestmark = pytest.mark.slow  # each test compiles (tens of seconds on the 2-core CPU)


def _batch(rows: int, prompt_len: int, response_len: int, seed: int):
    """Random prompts with a few masked (padding) positions and responses of random lengths."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 40, (rows, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt, dtype=torch.bool)
    prompt_mask[:, : prompt_len // 4] = torch.rand(rows, prompt_len // 4, generator=g) > 0.5
    response = torch.randint(3, 40, (rows, response_len), generator=g)
    lengths = torch.randint(1, response_len + 1, (rows,), generator=g)
    response_mask = torch.arange(response_len)[None, :] < lengths[:, None]
    return prompt, prompt_mask, response, response_mask


def test_compiled_scoring_gives_eager_log_probs_entropies_and_gradients(tiny_lab_model_dir):
    batch = _batch(6, 9, 14, seed=0)
    results = []
    for compiled in (False, True):
        policy = load_policy(str(tiny_lab_model_dir), compile_scoring=compiled)
        policy.model.train()
        scores = policy.score(*batch, temperature=0.7, with_entropy=True)
        weights = torch.randn(scores.logprobs.shape, generator=torch.Generator().manual_seed(1))
        loss = (weights * scores.logprobs * batch[3]).sum()
        grads = torch.autograd.grad(loss, [p for p in policy.model.parameters() if p.requires_grad])
        results.append((scores.logprobs * batch[3], scores.entropy * batch[3], grads))
    (eager_lp, eager_h, eager_grads), (lp, h, grads) = results
    torch.testing.assert_close(lp, eager_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, eager_h, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_a_first_bucket_as_wide_as_the_head_dimension_fixes_no_sizes(tiny_lab_model_dir):
    """16 rows, the lab model's head dimension: with duck sizing the row count would be fixed at 16
    and every other count would compile again."""
    policy = load_policy(str(tiny_lab_model_dir), compile_scoring=True)
    config = policy.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    policy.score(*_batch(head_dim, 10, 20, seed=2))
    graphs = counters["stats"]["unique_graphs"]
    for rows, prompt_len, response_len in ((11, 12, 25), (5, 7, 9)):
        scores = policy.score(*_batch(rows, prompt_len, response_len, seed=rows))
        assert scores.logprobs.shape == (rows, response_len)
    assert counters["stats"]["unique_graphs"] == graphs


def test_each_policy_in_a_process_gets_the_attention_kernels_it_chose(tiny_lab_model_dir, monkeypatch):
    """A compiled graph keeps the sdpa kernel it was traced with, whatever context it is called in;
    the policy chooses inside the compiled layer, so a second choice in the same process holds too.
    (A CPU has no cuDNN: math against flash stand in for a GPU's flash against cuDNN.)"""
    monkeypatch.setattr(backend, "EAGER_ON_CPU_UP_TO", 0)  # sdpa at any length, as on a GPU
    batch = _batch(3, 6, 8, seed=3)
    kernels = {}
    for choice in ((SDPBackend.MATH,), (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)):
        policy = load_policy(str(tiny_lab_model_dir), compile_scoring=True)
        monkeypatch.setattr(policy, "_sdpa_backends", lambda scoring, choice=choice: choice)
        policy.score(*batch)  # compiles
        with torch.profiler.profile() as profile:
            policy.score(*batch)
        names = {event.key for event in profile.key_averages()}
        kernels[choice[0]] = ("aten::_scaled_dot_product_flash_attention_for_cpu" in names, "aten::bmm" in names)
    assert kernels == {SDPBackend.MATH: (False, True), SDPBackend.FLASH_ATTENTION: (True, False)}
