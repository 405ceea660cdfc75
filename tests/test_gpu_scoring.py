"""Scoring's speed settings against the defaults on a GPU (skipped elsewhere).

`model.scoring_attention=cudnn` must be as close to float32's log-probs and gradients as flash is,
and run cuDNN's kernel; `model.keep_logits=true` must give the same log-probs as rebuilding the
logits and gradients as close to float32's; both eager and compiled.
On a CPU the kernel choice is torch's and these comparisons say nothing, so they run where CUDA is.
"""

import pytest
import torch
from factories import save_lab_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A lab-architecture model with heads of width 64 (what cuDNN's and flash's kernels take), and
    grouped-query attention (4 query heads over 2 key/value heads), as Qwen2.5 has."""
    return save_lab_model(tmp_path_factory.mktemp("gpu_lab"), hidden=256, layers=2, heads=4, kv_heads=2, ffn=512)


def _batch(rows: int = 6, prompt_len: int = 20, response_len: int = 90):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 40, (rows, prompt_len), generator=g)
    response = torch.randint(3, 40, (rows, response_len), generator=g)
    lengths = torch.randint(response_len // 2, response_len + 1, (rows,), generator=g)
    response_mask = torch.arange(response_len)[None, :] < lengths[:, None]
    return prompt, torch.ones_like(prompt, dtype=torch.bool), response, response_mask


def _scores_and_gradients(model_dir, dtype="bfloat16", **settings):
    """Log-probs (masked) and every weight's gradient of a fixed weighted sum, with the operators that ran."""
    from creditrl.policy.loading import load_policy

    policy = load_policy(str(model_dir), chat_template=False, device="cuda", dtype=dtype, **settings)
    policy.logits_chunk_elements = policy.model.config.vocab_size * 128  # 5 chunks of ≤ 128 positions
    policy.model.train()
    batch = _batch()
    mask = batch[3].cuda()
    weights = torch.randn(batch[2].shape, generator=torch.Generator().manual_seed(1)).cuda()
    policy.score(*batch)  # a warm-up: compiles when asked to
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        scores = policy.score(*batch)
        loss = (weights * scores.logprobs * mask).sum()
        grads = torch.autograd.grad(loss, [p for p in policy.model.parameters() if p.requires_grad])
    operators = {event.key for event in profile.key_averages()}
    return scores.logprobs * mask, [g.float() for g in grads], operators


@pytest.fixture(scope="module")
def float32_reference(model_dir):
    """Eager float32 weights: what both bf16 paths are measured against."""
    logprobs, grads, _ = _scores_and_gradients(model_dir, dtype="float32")
    return logprobs, grads


def _relative_errors(grads, reference) -> list[float]:
    return [((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference, strict=True)]


def _assert_as_close_as_bf16_allows(logprobs, grads, reference, baseline_grads):
    """Log-probs within bf16's reach of float32's, and every gradient no further from float32's than
    the default bf16 path's (1.2% at most on the CPU for this model) allows: 1.5 × its error + 1%."""
    reference_lp, reference_grads = reference
    torch.testing.assert_close(logprobs, reference_lp, atol=5e-2, rtol=5e-2)
    for error, baseline in zip(_relative_errors(grads, reference_grads),
                               _relative_errors(baseline_grads, reference_grads)):
        assert error <= 1.5 * baseline + 1e-2, (error, baseline)


@pytest.mark.parametrize("compiled", [False, True])
def test_cudnn_scoring_is_as_close_to_float32_as_flash_and_runs_cudnn(model_dir, float32_reference, compiled):
    _, flash_grads, flash_ops = _scores_and_gradients(model_dir, compile_scoring=compiled)
    cudnn_lp, cudnn_grads, cudnn_ops = _scores_and_gradients(model_dir, compile_scoring=compiled,
                                                             scoring_attention="cudnn")
    assert not any("cudnn_attention" in op for op in flash_ops)
    assert any("cudnn_attention" in op for op in cudnn_ops)
    _assert_as_close_as_bf16_allows(cudnn_lp, cudnn_grads, float32_reference, flash_grads)


@pytest.mark.parametrize("compiled", [False, True])
def test_kept_logits_give_gradients_as_close_to_float32_as_rebuilt_ones(model_dir, float32_reference, compiled):
    rebuilt_lp, rebuilt_grads, _ = _scores_and_gradients(model_dir, compile_scoring=compiled)
    kept_lp, kept_grads, _ = _scores_and_gradients(model_dir, compile_scoring=compiled, keep_logits=True)
    torch.testing.assert_close(kept_lp, rebuilt_lp, atol=1e-4, rtol=1e-4)  # the forward is the same
    _assert_as_close_as_bf16_allows(kept_lp, kept_grads, float32_reference, rebuilt_grads)
