"""The fused projection + log-softmax against plain autograd over the full logits, and torch's gradcheck."""

import weakref

import pytest
import torch

from creditrl.policy.token_logprobs import ProjectedLogprobs, chosen_token_logprobs


def _case(dtype=torch.float32, bias=True, n=37, d=8, vocab=50, seed=0):
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, vocab, bias=bias).to(dtype)
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    return head, hidden, torch.randint(0, vocab, (n,))


def _reference(head, hidden, targets, temperature):
    """Full logits through autograd: log_softmax, gather, −Σ p log p."""
    log_p = torch.log_softmax(head(hidden).float() / temperature, -1)
    return log_p.gather(-1, targets[:, None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def test_gradcheck_in_float64_with_the_entropy_gradient():
    head, hidden, targets = _case(torch.float64, n=6, d=4, vocab=7)
    weight = head.weight.detach().requires_grad_()
    bias = head.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w, b: ProjectedLogprobs.apply(h, w, b, targets, 0.7, True, True, False, 4),
        (hidden, weight, bias))  # two chunks: 4 positions and 2


@pytest.mark.parametrize("keep_logits", [False, True])
@pytest.mark.parametrize(("entropy_grad", "compiled"), [(False, False), (True, False),
                                                        pytest.param(False, True, marks=pytest.mark.slow),
                                                        pytest.param(True, True, marks=pytest.mark.slow)])
def test_chunks_match_full_autograd(entropy_grad, compiled, keep_logits):
    head, hidden, targets = _case()
    params = [hidden, head.weight, head.bias]
    ref_lp, ref_h = _reference(head, hidden, targets, 0.8)
    weights = torch.randn(2, 37)  # an arbitrary loss: a·log p + b·H
    ref_loss = (weights[0] * ref_lp).sum() + ((weights[1] * ref_h).sum() if entropy_grad else 0)
    ref_grads = torch.autograd.grad(ref_loss, params)
    lp, h = chosen_token_logprobs(hidden, head, targets, 0.8, with_entropy=True, entropy_grad=entropy_grad,
                                  chunk_elements=50 * 5, compiled=compiled, keep_logits=keep_logits)  # 8 chunks of ≤ 5
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(h, ref_h.detach())
    assert h.requires_grad == entropy_grad
    loss = (weights[0] * lp).sum() + ((weights[1] * h).sum() if entropy_grad else 0)
    for got, want in zip(torch.autograd.grad(loss, params), ref_grads):
        torch.testing.assert_close(got, want)


def test_gradcheck_in_float64_with_the_logits_kept_from_the_forward():
    head, hidden, targets = _case(torch.float64, n=6, d=4, vocab=7)
    weight = head.weight.detach().requires_grad_()
    bias = head.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w, b: ProjectedLogprobs.apply(h, w, b, targets, 0.7, True, True, False, 4, True),
        (hidden, weight, bias))


def test_logits_are_kept_only_when_a_backward_can_use_them():
    """Kept: each chunk's (positions × vocabulary) logits in the graph, with or without the entropy's
    gradient; nothing under no_grad, nor without `keep_logits`."""
    head, hidden, targets = _case()

    def kept_elements(keep_logits: bool = True, **kwargs) -> int:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            chosen_token_logprobs(hidden, head, targets, chunk_elements=50 * 5, keep_logits=keep_logits, **kwargs)
        return sum(rows * width for rows, width in (s for s in shapes if len(s) == 2) if width == 50)  # (n, vocab)

    assert kept_elements() == kept_elements(with_entropy=True, entropy_grad=True) == 37 * 50
    assert kept_elements(keep_logits=False) == 0


def test_without_gradients_one_chunk_of_logits_is_alive_at_a_time(monkeypatch):
    """Under no_grad (old and reference log-probs, evaluation) `keep_logits` must not hold the chunks:
    that would bring back the whole batch's logits the chunking exists to avoid."""
    import creditrl.policy.token_logprobs as module

    head, hidden, targets = _case()
    alive, most_alive = [], []
    real_logits = module._logits

    def counting_logits(*args):
        most_alive.append(sum(ref() is not None for ref in alive))  # earlier chunks still held at this call
        out = real_logits(*args)
        alive.append(weakref.ref(out))
        return out

    monkeypatch.setattr(module, "_logits", counting_logits)
    with torch.no_grad():
        chosen_token_logprobs(hidden, head, targets, chunk_elements=50 * 5, keep_logits=True)  # 8 chunks
    assert len(most_alive) == 8 and max(most_alive) <= 1  # only the loop's previous chunk
    alive.clear(), most_alive.clear()
    chosen_token_logprobs(hidden, head, targets, chunk_elements=50 * 5, keep_logits=True)
    assert most_alive[-1] == 7  # with gradients every chunk is kept for the backward


def test_bf16_autocast_over_float32_weights_matches_autograd_under_autocast():
    head, hidden, targets = _case(bias=False, d=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_lp, _ = _reference(head, hidden, targets, 1.0)
        lp, _ = chosen_token_logprobs(hidden, head, targets, chunk_elements=300 * 8)
    ref_grads = torch.autograd.grad(ref_lp.sum(), [hidden, head.weight])
    grads = torch.autograd.grad(lp.sum(), [hidden, head.weight])
    torch.testing.assert_close(lp, ref_lp)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # both sides round the matmul inputs to bf16


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_the_entropy_of_bf16_logits_is_summed_in_float32_under_autocast(compiled):
    """Only the projection runs in bf16: H = lse − Σ p·z over its logits is float32 arithmetic."""
    from creditrl.policy.token_logprobs import _kernels

    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 300)).to(torch.bfloat16)
    log_p = torch.log_softmax(logits.float(), -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lse, entropy = _kernels(compiled)[0](logits, 1.0, True)
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), -1))
    # two float32 forms of H (lse − Σ p·z against −Σ p log p); a bf16 dot is off by up to 2.5e-2 here
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep_logits", [False, True])
def test_bf16_weights_get_bf16_gradients_close_to_float32(keep_logits):
    head, hidden, targets = _case(bias=False, d=32, vocab=300)
    ref_lp, _ = _reference(head, hidden, targets, 1.0)
    ref_grads = torch.autograd.grad(ref_lp.sum(), [hidden, head.weight])
    head16 = head.to(torch.bfloat16)
    hidden16 = hidden.detach().to(torch.bfloat16).requires_grad_()
    lp, _ = chosen_token_logprobs(hidden16, head16, targets, chunk_elements=300 * 8, keep_logits=keep_logits)
    assert lp.dtype == torch.float32
    grads = torch.autograd.grad(lp.sum(), [hidden16, head16.weight])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def test_a_head_that_is_not_a_linear_layer_takes_the_checkpointed_path():
    head, hidden, targets = _case()

    def capped(h):  # a soft-capped head
        return 3.0 * torch.tanh(head(h) / 3.0)

    log_p = torch.log_softmax(capped(hidden), -1)
    ref_lp = log_p.gather(-1, targets[:, None]).squeeze(-1)
    lp, h = chosen_token_logprobs(hidden, capped, targets, with_entropy=True, chunk_elements=50 * 5)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(h, -(log_p.exp() * log_p).sum(-1).detach())
    for got, want in zip(torch.autograd.grad(lp.sum(), [hidden, head.weight]),
                         torch.autograd.grad(ref_lp.sum(), [hidden, head.weight])):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("keep_logits", [False, True])
def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do(keep_logits):
    head, hidden, targets = _case()
    head.requires_grad_(False)
    ref_lp, _ = _reference(head, hidden, targets, 1.0)
    lp, _ = chosen_token_logprobs(hidden, head, targets, chunk_elements=50 * 5, keep_logits=keep_logits)
    lp.sum().backward()
    assert head.weight.grad is None and head.bias.grad is None
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(ref_lp.sum(), hidden)[0])
