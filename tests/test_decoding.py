"""The KV-cache sampler, chunked log-probs and length-bucketed scoring, each against an independent route."""

import pytest
import torch
from transformers import GenerationConfig

from creditrl.policy.decoding import _draw, sample_with_cache
from creditrl.policy.token_logprobs import chosen_token_logprobs
from creditrl.policy.transformers_backend import SamplingConfig, left_pad, right_pad

PROMPTS = ["Start 7. Add 5.", "Start 13. Times 2. Minus 30. Add 1.", "Start 1."]


def _prompts(policy):
    return [policy.encode_prompt(p) for p in PROMPTS]


def test_greedy_decoding_equals_transformers_generate(tiny_policy):
    prompts = _prompts(tiny_policy)
    ids, mask = left_pad(prompts, tiny_policy.pad_id)
    out = sample_with_cache(tiny_policy.model, ids, mask, n=1, max_new_tokens=15, temperature=0.0, top_p=1.0,
                            end_ids=tiny_policy.eos_ids)
    for prompt, tokens in zip(prompts, out.tokens):
        reference = tiny_policy.model.generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=GenerationConfig(do_sample=False, max_new_tokens=15, eos_token_id=tiny_policy.eos_ids,
                                               pad_token_id=tiny_policy.pad_id))
        expected = reference[0, len(prompt):].tolist()
        assert tokens == expected[: len(tokens)] and len(tokens) == len(expected)


def test_one_prefill_per_prompt_gives_each_copy_the_same_greedy_answer(tiny_policy):
    prompts = _prompts(tiny_policy)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12)
    copies = tiny_policy.sample(prompts, 3, cfg, seed=0).response_ids
    single = tiny_policy.sample(prompts, 1, cfg, seed=0).response_ids
    assert copies == [r for r in single for _ in range(3)]


def test_sampled_logprobs_and_entropies_equal_a_fresh_forward(tiny_policy):
    """Rows end at different steps (finished rows leave the cache); each kept log-prob and entropy must still match."""
    prompts = _prompts(tiny_policy)
    gen = tiny_policy.sample(prompts, 4, SamplingConfig(temperature=0.7, max_new_tokens=25), seed=3)
    lengths = {len(r) for r in gen.response_ids}
    assert len(lengths) > 1, "the test needs responses of different lengths"
    for prompt, response, logprobs, entropies in zip(gen.prompt_ids, gen.response_ids, gen.logprobs, gen.entropies):
        with torch.no_grad():
            logits = tiny_policy.model(torch.tensor([prompt + response])).logits[0].float() / 0.7
        log_p = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(response)], -1)
        assert logprobs == pytest.approx(log_p[torch.arange(len(response)), response].tolist(), abs=1e-4)
        assert entropies == pytest.approx((-(log_p.exp() * log_p).sum(-1)).tolist(), abs=1e-4)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: with p = 0.7 the set is {0, 1} (0.5 < 0.7 ≤ 0.8), renormalised to 5/8, 3/8
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(40000, 4)
    torch.manual_seed(0)
    token, logprob, entropy = _draw(logits, temperature=1.0, top_p=0.7, uniforms=torch.rand(40000))
    counts = torch.bincount(token, minlength=4).float() / len(token)
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0].item() == pytest.approx(5 / 8, abs=0.01)
    # the returned log-prob and entropy are the untruncated policy's, the numbers the loss uses
    torch.testing.assert_close(logprob, logits[0].log_softmax(-1)[token])
    # H = −(0.5 ln 0.5 + 0.3 ln 0.3 + 0.15 ln 0.15 + 0.05 ln 0.05) = 1.14212
    torch.testing.assert_close(entropy, torch.full((40000,), 1.14212), atol=1e-5, rtol=0)


def test_chunked_logprobs_and_gradients_equal_one_full_softmax():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(37, 8, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    full = torch.log_softmax(head(hidden) / 0.8, -1).gather(-1, targets[:, None]).squeeze(-1)
    full_grad = torch.autograd.grad(full.sum(), [hidden, head.weight])
    chunked, entropy = chosen_token_logprobs(hidden, head, targets, temperature=0.8, with_entropy=True,
                                             chunk_elements=50 * 5)  # 5 positions per chunk: 8 chunks
    chunked_grad = torch.autograd.grad(chunked.sum(), [hidden, head.weight])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(chunked_grad, full_grad):
        torch.testing.assert_close(a, b)
    p = torch.softmax(head(hidden) / 0.8, -1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(-1).detach())


@pytest.mark.parametrize("buckets", [1, 2, 3])
def test_bucketed_packed_scoring_equals_one_row_at_a_time(tiny_policy, buckets):
    prompts = _prompts(tiny_policy)
    responses = [[10, 11, 12], [13, 14, 15, 16, 17, 18], [19]]
    p_ids, p_mask = left_pad(prompts, tiny_policy.pad_id)
    r_ids, r_mask = right_pad(responses, tiny_policy.pad_id)
    with torch.no_grad():
        scores = tiny_policy.score(p_ids, p_mask.bool(), r_ids, r_mask, with_entropy=True, buckets=buckets)
    assert tiny_policy.model.config._attn_implementation == "sdpa"  # eager for short rows, then restored
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = tiny_policy.model(torch.tensor([prompt + response])).logits[0].float()
        log_p = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(response)], -1)
        torch.testing.assert_close(scores.logprobs[i, : len(response)], log_p[torch.arange(len(response)), response],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(scores.entropy[i, : len(response)], -(log_p.exp() * log_p).sum(-1),
                                   atol=1e-5, rtol=1e-5)


def test_models_with_soft_capped_logits_are_scored_through_their_own_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from creditrl.policy.transformers_backend import (
        TransformersPolicy,
        _logits_are_plain_projection,
    )

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, final_logit_softcapping=5.0, pad_token_id=0)
    model = Gemma2ForCausalLM(cfg).eval()
    assert not _logits_are_plain_projection(model)

    class Tok:
        pad_token_id, eos_token_id = 0, 1

    policy = TransformersPolicy(model, Tok())
    prompt, response = [5, 6, 7], [8, 9]
    with torch.no_grad():
        got = policy.score(torch.tensor([prompt]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([response]),
                           torch.ones(1, 2, dtype=torch.bool)).logprobs[0]
        logits = model(torch.tensor([prompt + response])).logits[0, 2:4].float()
    torch.testing.assert_close(got, torch.log_softmax(logits, -1)[[0, 1], response])


def test_device_setting_is_checked():
    from creditrl.policy.loading import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="model.device: 'gpu' is not a torch device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            resolve_device("cuda")


def test_bucket_count_weighs_padding_against_the_cost_of_a_forward():
    from creditrl.policy.transformers_backend import FORWARD_COST_TOKENS, _bucket_count

    assert FORWARD_COST_TOKENS == 64  # the worked numbers below use it
    # [10, 10, 10, 100]: k=1 → 4·100 + 64 = 464; k=2 → 2·10 + 2·100 + 128 = 348;
    # k=3 (slices of 2, 1, 1 rows) → 2·10 + 10 + 100 + 192 = 322; k=4 → 130 + 256 = 386
    assert _bucket_count(torch.tensor([10, 10, 10, 100]), 4) == 3
    assert _bucket_count(torch.tensor([10, 10, 10, 100]), 2) == 2  # capped by the setting
    assert _bucket_count(torch.tensor([50] * 8), 4) == 1  # nothing to save
    assert _bucket_count(torch.tensor([7]), 4) == 1


def test_inverse_cdf_draws_follow_the_distribution_and_skip_zero_mass():
    from creditrl.policy.decoding import _inverse_cdf

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3]]).expand(60000, 5) * 3.0  # unnormalised on purpose
    torch.manual_seed(1)
    counts = torch.bincount(_inverse_cdf(probs, torch.rand(60000)), minlength=5).float() / 60000
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts, torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3]), atol=0.01, rtol=0)


def test_the_growing_cache_doubles_up_to_the_longest_row_and_no_further():
    from creditrl.policy.decoding import GrowingLayer

    layer = GrowingLayer(max_length=40)
    keys = torch.randn(2, 3, 30, 4)
    layer.update(keys, -keys)  # a prompt of 30 positions: the buffer holds exactly those
    assert layer._keys.shape[-2] == 30
    step = torch.randn(2, 3, 1, 4)
    layer.update(step, -step)  # full: it would double to 60, but no row gets past 40
    assert layer._keys.shape[-2] == 40
    torch.testing.assert_close(layer.keys, torch.cat([keys, step], dim=-2))
    torch.testing.assert_close(layer.values, -torch.cat([keys, step], dim=-2))
    unbounded = GrowingLayer()
    unbounded.update(keys, keys)
    unbounded.update(step, step)
    assert unbounded._keys.shape[-2] == 60
