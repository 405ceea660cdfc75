from contextlib import contextmanager

import pytest
import torch
from torch.nn.attention import SDPBackend

from creditrl.policy.transformers_backend import SamplingConfig, _logits_are_plain_projection, left_pad, right_pad

PROMPTS = ["Start 7. Add 5.", "Start 13. Times 2. Minus 30. Add 1.", "Start 1."]


def _encode(policy):
    return [policy.encode_prompt(p) for p in PROMPTS]


def test_batched_logprobs_equal_unbatched(tiny_policy):
    prompts = _encode(tiny_policy)
    responses = [[10, 11, 12], [13, 14, 15, 16, 17, 18], [19]]
    p_ids, p_mask = left_pad(prompts, tiny_policy.pad_id)
    r_ids, r_mask = right_pad(responses, tiny_policy.pad_id)
    with torch.no_grad():
        batched = tiny_policy.score(p_ids, p_mask.bool(), r_ids, r_mask, with_hidden=True)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = tiny_policy.score(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool),
                                      torch.tensor([response]), torch.ones(1, len(response), dtype=torch.bool),
                                      with_hidden=True)
            n = len(response)
            torch.testing.assert_close(batched.logprobs[i, :n], alone.logprobs[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.hidden_states[i, :n], alone.hidden_states[0], atol=1e-5, rtol=1e-5)


def test_logprobs_match_a_plain_forward(tiny_policy):
    prompt, response = _encode(tiny_policy)[0], [20, 21, 22, 23]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = tiny_policy.model(ids).logits[0].float()
        expected = torch.stack([torch.log_softmax(logits[len(prompt) - 1 + k], -1)[t] for k, t in enumerate(response)])
        got = tiny_policy.score(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool),
                                torch.tensor([response]), torch.ones(1, 4, dtype=torch.bool)).logprobs[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hidden_states_are_taken_before_the_final_norm(tiny_policy):
    prompt, response = _encode(tiny_policy)[1], [20, 21, 22]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        out = tiny_policy.model(ids, output_hidden_states=True)
        scores = tiny_policy.score(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.bool),
                                   torch.tensor([response]), torch.ones(1, 3, dtype=torch.bool), with_hidden=True)
        # Independent route: run the decoder layers by hand through the model's own forward with a hook-free
        # check: the final norm of our captured states must reproduce the logits of the response positions.
        normed = tiny_policy.model.model.norm(scores.hidden_states)
        logits = tiny_policy.model.lm_head(normed)
    positions = slice(len(prompt) - 1, len(prompt) - 1 + 3)
    torch.testing.assert_close(logits[0], out.logits[0, positions], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores.hidden_states[0], normed[0], atol=1e-3)  # the norm really was not applied yet


def test_greedy_sampling_batched_equals_one_by_one(tiny_policy):
    prompts = _encode(tiny_policy)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12)
    batched = tiny_policy.sample(prompts, 1, cfg, seed=0).response_ids
    alone = [tiny_policy.sample([p], 1, cfg, seed=0).response_ids[0] for p in prompts]
    assert batched == alone


def test_sampling_is_seeded_and_grouped(tiny_policy):
    prompts = _encode(tiny_policy)
    cfg = SamplingConfig(max_new_tokens=10)
    a = tiny_policy.sample(prompts, 3, cfg, seed=5)
    b = tiny_policy.sample(prompts, 3, cfg, seed=5)
    c = tiny_policy.sample(prompts, 3, cfg, seed=6)
    assert a.response_ids == b.response_ids and a.response_ids != c.response_ids
    assert a.prompt_ids == [p for p in prompts for _ in range(3)]
    assert all(len(r) <= 10 for r in a.response_ids)
    assert all(t == (len(r) == 10 and tiny_policy.eos_ids[0] not in r) for r, t in zip(a.response_ids, a.truncated))


@pytest.mark.parametrize("engine", ["kv-cache", "generate"])
def test_stop_strings_end_the_response(tiny_policy, engine):
    prompts = _encode(tiny_policy)
    free = tiny_policy.sample(prompts, 2, SamplingConfig(engine=engine, max_new_tokens=30), seed=1)
    stopped = tiny_policy.sample(prompts, 2, SamplingConfig(engine=engine, max_new_tokens=30, stop=["1"]), seed=1)
    assert any("1" in tiny_policy.decode(full) for full in free.response_ids)  # the check below does act
    for full, cut in zip(free.response_ids, stopped.response_ids):
        text = tiny_policy.decode(full)
        if "1" in text:
            assert tiny_policy.decode(cut).endswith("1") and tiny_policy.decode(cut).count("1") == 1
            assert cut == full[: len(cut)]
        else:
            assert cut == full


def test_the_generate_engine_looks_for_stop_strings_in_the_response_alone(tiny_policy):
    """A prompt ending in "\n" and a response starting with "\n": transformers' own stop-string criterion
    sees "\n\n" across the boundary; the engine's (as the kv-cache engine) waits for the response's own."""
    from transformers import StopStringCriteria

    from creditrl.policy.transformers_backend import _ResponseStopStrings

    prompt = tiny_policy.encode_prompt("1+1=")
    assert tiny_policy.decode(prompt).endswith("\n")
    newline = tiny_policy.tokenizer("\n", add_special_tokens=False)["input_ids"]
    ours = _ResponseStopStrings(tiny_policy.tokenizer, ["\n\n"], len(prompt))
    theirs = StopStringCriteria(tiny_policy.tokenizer, ["\n\n"])
    one, two = torch.tensor([prompt + newline]), torch.tensor([prompt + newline * 2])
    assert theirs(one, None).item() and not ours(one, None).item()
    assert ours(two, None).item()


def test_the_shortest_prefix_holding_a_stop_string_is_found(tiny_policy):
    from creditrl.policy.transformers_backend import _stop_string_end

    gen = torch.Generator().manual_seed(0)
    vocab = tiny_policy.tokenizer("0123456789+=\n", add_special_tokens=False)["input_ids"]
    for _ in range(50):
        row = [vocab[int(i)] for i in torch.randint(0, len(vocab), (20,), generator=gen)]
        stops = ["12", "\n="]
        by_hand = next((k for k in range(1, len(row) + 1)
                        if any(s in tiny_policy.tokenizer.decode(row[:k]) for s in stops)), None)
        assert _stop_string_end(tiny_policy.tokenizer, row, stops) == by_hand


def test_generate_samples_softmax_with_temperature_and_top_p_only(tiny_policy, monkeypatch):
    """The model's own generation_config (top_k=1, a repetition penalty, min_p here) and transformers'
    default top_k=50 must not reach the sampler: the distribution scored is softmax(z/τ) cut at top_p."""
    own = tiny_policy.model.generation_config
    own.top_k, own.repetition_penalty, own.min_p = 1, 2.0, 0.5
    used = []
    real = type(tiny_policy.model)._get_logits_processor

    def spy(self, *args, **kwargs):
        used.append(real(self, *args, **kwargs))
        return used[-1]

    monkeypatch.setattr(type(tiny_policy.model), "_get_logits_processor", spy)
    tiny_policy.sample(_encode(tiny_policy), 2, SamplingConfig(engine="generate", temperature=0.7, top_p=0.9,
                                                               max_new_tokens=4), seed=0)
    assert [type(p).__name__ for p in used[0]] == ["TemperatureLogitsWarper", "TopPLogitsWarper"]
    assert tiny_policy.model.generation_config is own and own.top_k == 1  # the model's own config is back


def test_bf16_autocast_scores_close_to_float32(tiny_policy):
    prompts = _encode(tiny_policy)
    p_ids, p_mask = left_pad(prompts, tiny_policy.pad_id)
    r_ids, r_mask = right_pad([[10, 11, 12]] * len(prompts), tiny_policy.pad_id)
    with torch.no_grad():
        exact = tiny_policy.score(p_ids, p_mask.bool(), r_ids, r_mask).logprobs
        tiny_policy.autocast_dtype = torch.bfloat16
        fast = tiny_policy.score(p_ids, p_mask.bool(), r_ids, r_mask).logprobs
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, atol=0.05, rtol=0.05)


def test_entropy_keeps_no_graph_unless_it_is_trained(tiny_policy):
    ids, mask = right_pad([[5, 6, 7], [8, 9]], tiny_policy.pad_id)
    prompt, prompt_mask = left_pad([[3, 4], [3]], tiny_policy.pad_id)
    logged = tiny_policy.score(prompt, prompt_mask.bool(), ids, mask.bool(), with_entropy=True)
    trained = tiny_policy.score(prompt, prompt_mask.bool(), ids, mask.bool(), with_entropy=True, entropy_grad=True)
    assert logged.logprobs.requires_grad and not logged.entropy.requires_grad
    assert trained.entropy.requires_grad
    torch.testing.assert_close(logged.entropy, trained.entropy.detach())


def test_sampling_no_prompts_gives_an_empty_generation(tiny_policy):
    gen = tiny_policy.sample([], 4, SamplingConfig(max_new_tokens=4), seed=0)
    assert (gen.prompt_ids, gen.response_ids, gen.truncated, gen.calls) == ([], [], [], 0)


@pytest.mark.parametrize(("batch_size", "n", "expected"), [(8, 3, 3), (8, 9, 5), (64, 3, 1)])
@pytest.mark.parametrize("engine", ["kv-cache", "generate"])
def test_a_generation_counts_the_engine_calls_that_made_it(tiny_policy, monkeypatch, engine, batch_size, n, expected):
    """A group never straddles two calls: 5 prompts × 3 in batches of 8 take 3 calls (2 prompts each), not ⌈15/8⌉."""
    method = "sample_kv_cache_call" if engine == "kv-cache" else "generate_call"
    calls = []
    real = getattr(type(tiny_policy), method)
    monkeypatch.setattr(type(tiny_policy), method, lambda self, *a: calls.append(1) or real(self, *a))
    prompts = [tiny_policy.encode_prompt(f"Start {i}.") for i in range(5)]
    gen = tiny_policy.sample(prompts, n, SamplingConfig(max_new_tokens=2, batch_size=batch_size, engine=engine), seed=0)
    assert gen.calls == len(calls) == expected and len(gen.response_ids) == 5 * n


def test_gpu_attention_leaves_out_cudnn_and_restores_the_flags(tiny_policy, monkeypatch):
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())
    with tiny_policy._attention_kernels():  # a CPU: torch's own choice
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before
    monkeypatch.setattr(type(tiny_policy), "device", property(lambda self: torch.device("cuda")))
    with tiny_policy._attention_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_scoring_may_put_cudnn_first_and_sampling_still_leaves_it_out(tiny_policy, monkeypatch):
    monkeypatch.setattr(type(tiny_policy), "device", property(lambda self: torch.device("cuda")))
    with tiny_policy._attention_kernels(scoring=True):  # the default, "flash"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    monkeypatch.setattr(tiny_policy, "scoring_attention", "cudnn")
    with tiny_policy._attention_kernels(scoring=True):
        assert torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.CUDNN_ATTENTION)
    with tiny_policy._attention_kernels():
        assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_cudnn_scoring_rounds_bucket_widths_up_and_scores_the_same(tiny_policy, monkeypatch):
    gen = tiny_policy.sample(_encode(tiny_policy), 2, SamplingConfig(max_new_tokens=5), seed=0)
    batch = (*left_pad(gen.prompt_ids, tiny_policy.pad_id), *right_pad(gen.response_ids, tiny_policy.pad_id))
    widths = []
    assert _logits_are_plain_projection(tiny_policy.model)  # its one-off 8-token check is done before counting
    decoder = tiny_policy.model.get_decoder()  # what scoring calls (it applies the head itself)
    handle = decoder.register_forward_pre_hook(lambda _m, _args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                               with_kwargs=True)
    try:
        flash = tiny_policy.score(*batch, buckets=2)
        monkeypatch.setattr(tiny_policy, "scoring_attention", "cudnn")
        cudnn = tiny_policy.score(*batch, buckets=2)
    finally:
        handle.remove()
    longest_row = max(len(p) + len(r) for p, r in zip(gen.prompt_ids, gen.response_ids))
    assert max(widths[: len(widths) // 2]) == longest_row < 128
    assert widths[len(widths) // 2 :] == [128] * (len(widths) // 2)
    torch.testing.assert_close(cudnn.logprobs * batch[3], flash.logprobs * batch[3])


def test_every_forward_of_sampling_and_scoring_runs_under_the_attention_choice(tiny_policy, monkeypatch):
    inside, seen = [None], []

    @contextmanager
    def recording(scoring=False):
        inside[0] = "scoring" if scoring else "sampling"
        try:
            yield
        finally:
            inside[0] = None

    monkeypatch.setattr(tiny_policy, "_attention_kernels", recording)
    handle = tiny_policy.model.get_decoder().register_forward_pre_hook(lambda *_: seen.append(inside[0]))
    try:
        gen = tiny_policy.sample(_encode(tiny_policy), 2, SamplingConfig(max_new_tokens=3), seed=0)
        sampled = len(seen)
        p_ids, p_mask = left_pad(gen.prompt_ids, tiny_policy.pad_id)
        r_ids, r_mask = right_pad(gen.response_ids, tiny_policy.pad_id)
        tiny_policy.score(p_ids, p_mask, r_ids, r_mask)
    finally:
        handle.remove()
    assert 0 < sampled < len(seen)
    assert seen == ["sampling"] * sampled + ["scoring"] * (len(seen) - sampled)


def test_a_static_cache_that_cannot_take_autocast_says_what_to_change(tiny_policy, monkeypatch):
    def failing_generate(**_kwargs):  # what transformers 5.17's static cache raises under bf16 autocast
        raise RuntimeError("index_copy_(): self and source expected to have the same dtype, but got (self) Float "
                           "and (source) BFloat16")

    monkeypatch.setattr(tiny_policy.model, "generate", failing_generate)
    monkeypatch.setattr(tiny_policy, "autocast_dtype", torch.bfloat16)
    cfg = SamplingConfig(max_new_tokens=2, engine="generate", static_cache=True)
    with pytest.raises(RuntimeError, match="sampling.static_cache=false"):
        tiny_policy.sample(_encode(tiny_policy), 1, cfg, seed=0)
    with pytest.raises(RuntimeError, match="^index_copy_"):  # anything else passes through unchanged
        tiny_policy.sample(_encode(tiny_policy), 1, cfg.model_copy(update={"static_cache": False}), seed=0)


def test_a_configured_policy_takes_every_model_setting_and_a_command_may_swap_the_model(monkeypatch):
    import creditrl.policy.loading as loading
    from creditrl.config import ModelConfig

    calls = []
    monkeypatch.setattr(loading, "load_policy", lambda *args: calls.append(args))
    section = ModelConfig(name="run-model", gguf_file="q8.gguf", device="cpu", dtype="bfloat16", compile=True,
                          scoring_attention="cudnn", keep_logits=True, logits_chunk_mib=64)
    loading.load_configured_policy(section)
    loading.load_configured_policy(section, "other-model")  # `creditrl eval --model other-model`
    settings = (None, False, 64, "cpu", "bfloat16", True, "cudnn", True)
    assert calls == [("run-model", "q8.gguf", *settings), ("other-model", None, *settings)]


def test_a_model_that_scales_its_logits_in_its_own_forward_is_scored_through_it(tiny_policy):
    """Falcon-H1 multiplies the head's output by lm_head_multiplier inside its forward, under a name no
    config list had: the head applied to the decoder's output must give the forward's logits, or the
    forward is used."""
    from transformers import FalconH1Config, FalconH1ForCausalLM

    from creditrl.policy.transformers_backend import TransformersPolicy

    torch.manual_seed(0)
    config = FalconH1Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, mamba_d_ssm=32, mamba_n_heads=2,
                            mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4,
                            lm_head_multiplier=3.0, pad_token_id=0, tie_word_embeddings=False)
    model = FalconH1ForCausalLM(config).eval()
    policy = TransformersPolicy(model, tiny_policy.tokenizer)
    prompt, response = [5, 6, 7], [8, 9]
    with torch.no_grad():
        scored = policy.score(torch.tensor([prompt]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([response]),
                              torch.ones(1, 2, dtype=torch.bool)).logprobs[0]
        logits = model(torch.tensor([prompt + response])).logits[0, 2:4].float()
    torch.testing.assert_close(scored, torch.log_softmax(logits, -1)[[0, 1], response], rtol=1e-5, atol=1e-5)
    assert not _logits_are_plain_projection(model) and _logits_are_plain_projection(tiny_policy.model)
