"""The policy backend over transformers: batched sampling and per-token log-probs.

Sampling left-pads prompts and takes position ids from the attention mask; scoring packs each
row's prompt and response side by side from position 0 into length buckets (right padding
only).  Either way a row's numbers do not depend on what else is in its batch (tests check
batched = unbatched).

On a GPU both run with cuDNN's attention kernel switched off (`_attention_kernels`): torch puts
it first on Hopper and newer cards, and it builds an execution plan for every new (batch, query
length, key length) it meets, which in RL, where prompt and response lengths change every step,
is nearly every call (on an H100 with torch 2.11, a decode step of a 64-row batch took 96 ms when
its lengths were new to the process and 28 ms when they were not).  Scoring may ask for cuDNN
(`scoring_attention="cudnn"`): its forward and backward are faster at training lengths, and
scoring then rounds each bucket's width up to a multiple of `CUDNN_WIDTH_MULTIPLE` tokens, so
that the shapes it plans for repeat from step to step.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
import transformers
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from creditrl.config import SamplingConfig
from creditrl.policy.compiling import compile_dynamic
from creditrl.policy.decoding import sample_with_cache
from creditrl.policy.engines import get_engine
from creditrl.policy.generation import Generation, TokenScores
from creditrl.policy.token_logprobs import chosen_token_logprobs
from creditrl.rollouts import pad_right


class TransformersPolicy:
    """A causal LM and its tokenizer, with the two operations RL needs."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = False,
                 autocast_dtype: torch.dtype | None = None, logits_chunk_elements: int = 2 ** 26,
                 compile_scoring: bool = False, scoring_attention: str = "flash", keep_logits: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.autocast_dtype = autocast_dtype
        self.logits_chunk_elements = logits_chunk_elements  # float32 logits held at once when scoring
        self.compile_scoring = compile_scoring  # score through torch.compile (`_compiled_layers`)
        self.scoring_attention = scoring_attention  # "flash" or "cudnn" (`_attention_kernels`)
        self.keep_logits = keep_logits  # the backward takes the forward's logits (`ProjectedLogprobs`)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        # optimizer steps taken on the weights, counted by the trainer: an engine holding a copy of the weights
        # (vLLM) re-copies when it moves (a fused AdamW step leaves the parameters' `_version` as it was)
        self.updates = 0
        # called with the number of prompts each sampling call finished (an evaluation's progress bar)
        self.on_sampled: Callable[[int], None] | None = None

    def enable_activation_checkpointing(self) -> None:
        """Keep each decoder layer's input for the backward and recompute the rest there (train mode only:
        sampling runs in eval mode with its cache).  transformers 5 calls it activation checkpointing."""
        if hasattr(self.model, "activation_checkpointing_enable"):
            self.model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def checkpointing_activations(self) -> bool:
        """Whether the model recomputes its layers in the backward (under either transformers name)."""
        name = "is_activation_checkpointing" if hasattr(self.model, "activation_checkpointing_enable") \
            else "is_gradient_checkpointing"
        return bool(getattr(self.model, name, False))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _sdpa_backends(self, scoring: bool) -> tuple[SDPBackend, ...] | None:
        """sdpa's kernels in priority order on a GPU: without cuDNN's, or with it first when `scoring` and
        the policy asks for it (see the module docstring).  None on a CPU: torch's own choice."""
        if self.device.type != "cuda":
            return None
        return (SDPBackend.CUDNN_ATTENTION, *WITHOUT_CUDNN) if scoring and self.scoring_attention == "cudnn" \
            else WITHOUT_CUDNN

    def _attention_kernels(self, scoring: bool = False):
        backends = self._sdpa_backends(scoring)
        return nullcontext() if backends is None else sdpa_kernel(list(backends), set_priority=True)

    # ---- prompts ---------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt: the chat template for chat models, else the text and a newline."""
        if self.use_chat_template:
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                           add_generation_prompt=True, tokenize=True,
                                                           return_dict=False))
        return self.tokenizer(text + "\n", add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- sampling --------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n: int, cfg: SamplingConfig, seed: int) -> Generation:
        """n responses per prompt, rows prompt-major (prompt 0's n samples first)."""
        if not prompt_ids:
            return Generation([], [], [], [], [], calls=0)
        return get_engine(cfg.engine).sample(self, prompt_ids, n, cfg, seed)

    def sample_in_calls(self, prompt_ids: list[list[int]], n: int, cfg: SamplingConfig, seed: int,
                        one_call: Callable[[list[list[int]], int, SamplingConfig], Generation]) -> Generation:
        """Sample through this process's model: `one_call(prompts, n, cfg)` on as many prompts at a time as
        `cfg.batch_size` rows allow, seeded once, in eval mode (no dropout) under the policy's autocast."""
        torch.manual_seed(seed)
        parts: list[Generation] = []
        prompts_per_call = max(1, cfg.batch_size // n)
        with evaluation_mode(self.model), self._autocast(), self._attention_kernels():
            for start in range(0, len(prompt_ids), prompts_per_call):
                chunk = prompt_ids[start:start + prompts_per_call]
                parts.append(one_call(chunk, n, cfg))
                if self.on_sampled is not None:
                    self.on_sampled(len(chunk))
        return Generation([p for p in prompt_ids for _ in range(n)],
                          [r for g in parts for r in g.response_ids], [t for g in parts for t in g.truncated],
                          None if parts[0].logprobs is None else [lp for g in parts for lp in g.logprobs],
                          None if parts[0].entropies is None else [h for g in parts for h in g.entropies],
                          calls=len(parts))

    def sample_kv_cache_call(self, prompts: list[list[int]], n: int, cfg: SamplingConfig) -> Generation:
        """One call of the kv-cache sampler (`decoding.sample_with_cache`): n responses per prompt."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        stopped = None
        if cfg.stop:
            def stopped(_row: int, tokens: list[int]) -> bool:
                return _tail_has_stop(self.tokenizer, tokens, cfg.stop)
        out = sample_with_cache(self.model, ids, mask, n, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                self.eos_ids, stopped)
        rows = [p for p in prompts for _ in range(n)]
        responses, truncated, logprobs, entropies = [], [], [], []
        for tokens, lps, hs, ended in zip(out.tokens, out.logprobs, out.entropies, out.ended):
            stopped_on_string = ended and cfg.stop and tokens[-1] not in self.eos_ids
            cut = _stop_string_end(self.tokenizer, tokens, cfg.stop) if stopped_on_string else None
            responses.append(tokens[:cut])
            logprobs.append(lps[:cut])
            entropies.append(hs[:cut])
            truncated.append(not ended)
        return Generation(rows, responses, truncated, logprobs, entropies)

    def generate_call(self, rows: list[list[int]], cfg: SamplingConfig) -> Generation:
        """One call of transformers' model.generate: one response per row."""
        ids, mask = left_pad(rows, self.pad_id, self.device)
        greedy = cfg.temperature == 0.0
        gen_cfg = GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else cfg.temperature,
            top_p=None if greedy else cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
            cache_implementation="static" if cfg.static_cache else None,
        )
        # the response alone is searched for stop strings, as in the kv-cache engine (transformers' own
        # stop_strings also match across the prompt's end)
        stopping = [_ResponseStopStrings(self.tokenizer, cfg.stop, ids.shape[1])] if cfg.stop else None
        # generate fills every setting left unset from the model's generation_config (top_k, min_p,
        # repetition_penalty, ...), and then top_k=50 from its own defaults: with a bare one for the
        # call and top_k=0, it samples from exactly softmax(z/τ) cut at top_p, as the kv-cache engine does
        # (scoring reads softmax(z/τ) untruncated, as TRL and verl do)
        # (under LoRA peft's generate copies the wrapper's config into the base model: both get theirs back)
        holders = [self.model] + ([self.model.get_base_model()] if hasattr(self.model, "get_base_model") else [])
        model_defaults = [holder.generation_config for holder in holders]
        self.model.generation_config = GenerationConfig()
        try:
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                      stopping_criteria=stopping)
        except RuntimeError as err:
            if cfg.static_cache and self.autocast_dtype is not None and "same dtype" in str(err):
                raise RuntimeError(
                    f"sampling.static_cache=true with model.bf16_autocast=true failed in transformers "
                    f"{transformers.__version__} ({str(err).splitlines()[0]}): its static cache takes one dtype "
                    f"for keys and values, which autocast mixes. transformers 5.24 runs it, and bf16 weights "
                    f"(model.dtype=bfloat16, model.bf16_autocast=false) need no autocast; or set "
                    f"sampling.static_cache=false") from err
            raise
        finally:
            for holder, defaults in zip(holders, model_defaults):
                holder.generation_config = defaults
        new = out[:, ids.shape[1]:].tolist()
        responses, truncated = [], []
        for row in new:
            # a row stopped by a stop string is filled with the pad token, which may be an end token too:
            # the earlier of the two cuts is where the row ended
            cuts = [next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), None),
                    _stop_string_end(self.tokenizer, row, cfg.stop) if cfg.stop else None]
            cut = min((c for c in cuts if c is not None), default=None)
            responses.append(row[:cut] if cut is not None else row)
            truncated.append(cut is None and len(row) >= cfg.max_new_tokens)
        return Generation(rows, responses, truncated)

    # ---- scoring ---------------------------------------------------------------------------
    def score(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
              temperature: float = 1.0, with_entropy: bool = False, with_hidden: bool = False,
              entropy_grad: bool = False, buckets: int = 1) -> TokenScores:
        """log π(response token | prefix) for every response position (B, T).

        Rows are sorted by length and cut into at most `buckets` forwards (the count that
        minimises padded tokens plus a fixed cost per forward, `_bucket_count`); in each, a row's prompt and
        response sit side by side from position 0 (no padding inside a row, right padding only,
        so causal attention needs no mask), and the bucket is as wide as its longest row.  The
        results come back in the caller's row order.  Gradients flow when called outside
        `torch.no_grad()` (the update uses it that way); the entropy carries them only with
        `entropy_grad` (an entropy bonus).  Logits are divided by the sampling temperature, so
        log-probs match the sampling policy.  Positions past a row's response hold finite filler.
        """
        prompt_len, response_len = prompt_mask.sum(1), response_mask.sum(1)
        order = (prompt_len + response_len).argsort(stable=True)
        longest = int((prompt_len + response_len).max()) if len(order) else 0
        # one autocast region for all buckets: autocast casts each weight once and reuses it
        with (self._autocast(), self._attention_kernels(scoring=True), self._short_sequence_attention(longest),
              self._compiled_layers()):
            parts = [self._score_packed(prompt_ids[rows], prompt_mask[rows], response_ids[rows], response_len[rows],
                                        temperature, with_entropy, with_hidden, entropy_grad)
                     for rows in order.tensor_split(_bucket_count((prompt_len + response_len)[order], buckets))]
        width = response_ids.shape[1]
        restore = order.argsort()

        def joined(i: int) -> Tensor:
            padded = [torch.nn.functional.pad(p[i], (0, 0) * (p[i].dim() - 2) + (0, width - p[i].shape[1]))
                      for p in parts]
            return torch.cat(padded)[restore]
        return TokenScores(joined(0), joined(1) if with_entropy else None, joined(2) if with_hidden else None)

    def _score_packed(self, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_len: Tensor,
                      temperature: float, with_entropy: bool, with_hidden: bool, entropy_grad: bool) -> tuple:
        """One bucket: (logprobs, entropy, hidden), each (b, longest response in the bucket, ...)."""
        rows = [torch.cat([p[m.bool()], r[:n]]) for p, m, r, n in zip(prompt_ids, prompt_mask, response_ids,
                                                                     response_len.tolist())]
        packed_width = max(len(r) for r in rows)
        if self.scoring_attention == "cudnn":  # widths from a short list, so cuDNN plans each shape once
            packed_width += -packed_width % CUDNN_WIDTH_MULTIPLE
        packed = pad_right(rows, self.pad_id, packed_width).to(self.device)
        width = int(response_len.max()) if len(rows) else 0
        # position plen − 1 + k predicts response token k
        offsets = torch.arange(width, device=prompt_mask.device)
        where = (prompt_mask.sum(1, keepdim=True) - 1 + offsets).clamp(0, packed.shape[1] - 1).to(self.device)
        targets = response_ids[:, :width].to(self.device)
        positions = torch.arange(packed.shape[1], device=self.device).expand_as(packed)
        plain_head = _logits_are_plain_projection(self.model)  # (its one-off check runs outside the capture)
        with self._capture_last_layer(with_hidden) as captured:
            if plain_head:
                states = self.model.get_decoder()(input_ids=packed, position_ids=positions, use_cache=False)
                picked, head = _take_positions(states.last_hidden_state, where), self.model.get_output_embeddings()
            else:
                logits = self.model(input_ids=packed, position_ids=positions, use_cache=False).logits
                picked, head = _take_positions(logits, where), _identity
            logprobs, entropy = chosen_token_logprobs(picked.flatten(0, 1), head, targets.flatten(), temperature,
                                                      with_entropy, entropy_grad, self.logits_chunk_elements,
                                                      self.compile_scoring, self.keep_logits)
        shape = targets.shape
        hidden = _take_positions(captured[0], where) if with_hidden else None
        return logprobs.view(shape), None if entropy is None else entropy.view(shape), hidden

    @contextmanager
    def _short_sequence_attention(self, length: int):
        """On a CPU, sequences of at most EAGER_ON_CPU_UP_TO tokens are scored with eager attention
        instead of sdpa: sdpa's CPU flash kernel is slow in the backward at these lengths (SmolLM2,
        8 rows of ~80 tokens, bf16: the update 11% faster), and eager's T × T probabilities stay small.
        Not under gradient checkpointing, whose recompute in the backward runs after the switch is undone."""
        switch = (self.device.type == "cpu" and length <= EAGER_ON_CPU_UP_TO
                  and self.model.config._attn_implementation == "sdpa" and not self.checkpointing_activations)
        if switch:
            self.model.set_attn_implementation("eager")
        try:
            yield
        finally:
            if switch:
                self.model.set_attn_implementation("sdpa")

    @contextmanager
    def _compiled_layers(self):
        """With `compile_scoring`, each decoder layer's forward runs through torch.compile while scoring
        (regional compilation: the layers share one class, so one graph, with dynamic shapes, serves
        them all and every bucket); it fuses the norms, rotary embedding, activation and residual
        adds that eager mode runs as separate kernels.  Sampling keeps the eager layers."""
        if not self.compile_scoring:
            yield
            return
        layers = self.model.get_decoder().layers
        forward = _compiled_forward(type(layers[0]), self._sdpa_backends(scoring=True))
        for layer in layers:
            layer.forward = functools.partial(forward, layer)  # Module.__call__ finds the instance's forward first
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward

    @contextmanager
    def _capture_last_layer(self, enabled: bool):
        captured: list[Tensor] = []
        if not enabled:
            yield captured
            return
        layer = self.model.get_decoder().layers[-1]
        handle = layer.register_forward_hook(
            lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
        try:
            yield captured
        finally:
            handle.remove()


@contextmanager
def evaluation_mode(model: nn.Module):
    """`model` in eval mode inside (no dropout: what the sampler samples from), its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@functools.cache
def _compiled_forward(layer_class: type, attention: tuple[SDPBackend, ...] | None) -> Callable:
    """A decoder layer class's forward, compiled once for every layer of the class (`self` is an argument).

    The sdpa kernels (`attention`, in priority order; None: torch's choice) are chosen inside the
    compiled function: a compiled graph keeps the kernel it was traced with whatever context it is
    called in, so a choice made outside would only hold for the first policy of a process."""
    forward = layer_class.forward
    if attention is None:
        return compile_dynamic(forward)

    def forward_with_kernels(self, *args, **kwargs):
        with sdpa_kernel(list(attention), set_priority=True):
            return forward(self, *args, **kwargs)
    return compile_dynamic(forward_with_kernels)


EAGER_ON_CPU_UP_TO = 512  # tokens per row
WITHOUT_CUDNN = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
# scoring widths with scoring_attention="cudnn" (a 2,048-token limit: 16 shapes per row count)
CUDNN_WIDTH_MULTIPLE = 128
FORWARD_COST_TOKENS = 64  # what one more forward costs, in padded tokens (weight casts, gradient sums, launches)


def _bucket_count(sorted_lengths: Tensor, most: int) -> int:
    """The k ≤ most that minimises Σ_bucket rows × longest row + k · FORWARD_COST_TOKENS,
    for k equal slices of the rows sorted by length."""
    lengths = sorted_lengths.tolist()

    def cost(k: int) -> int:
        slices = torch.arange(len(lengths)).tensor_split(k)
        return sum(len(s) * lengths[s[-1]] for s in slices if len(s)) + k * FORWARD_COST_TOKENS
    return min(range(1, max(1, min(most, len(lengths))) + 1), key=cost)


def _logits_are_plain_projection(model: PreTrainedModel) -> bool:
    """Whether logits = output_embeddings(final hidden state), so scoring may apply the head itself.

    Models that scale or soft-cap their logits in their own forward (Gemma 2/3's softcapping,
    Granite's logits_scaling, Cohere's logit_scale, Falcon-H1's lm_head_multiplier, ...) are scored
    through that forward instead.  Checked once per model, by name where the config says so, else
    on 8 tokens: the head over the decoder's output must give the forward's logits.
    """
    known = getattr(model, "_creditrl_plain_head", None)
    if known is not None:
        return known
    cfg, head = model.config.get_text_config(), model.get_output_embeddings()
    special = [getattr(cfg, name, None) for name in ("final_logit_softcapping", "logits_scaling", "logit_scale")]
    plain = all(v in (None, 1, 1.0) for v in special) and isinstance(head, torch.nn.Linear)
    if plain:
        ids = torch.arange(8, device=head.weight.device).remainder(head.out_features)[None]
        with torch.no_grad(), evaluation_mode(model), torch.autocast(ids.device.type, enabled=False):
            forward = model(input_ids=ids, use_cache=False).logits
            projected = head(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
        plain = torch.allclose(projected.float(), forward.float(), rtol=1e-2, atol=1e-3)  # bf16 weights: roundings
    model._creditrl_plain_head = plain
    return plain


def _take_positions(x: Tensor, where: Tensor) -> Tensor:
    """x (b, L, D) at positions where (b, T) → (b, T, D)."""
    return x.gather(1, where[..., None].expand(-1, -1, x.shape[-1]))


def _identity(x: Tensor) -> Tensor:
    return x


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    ids = pad_right(tensors, pad_id)
    mask = pad_right([torch.ones(len(r), dtype=torch.bool) for r in rows], False)
    return ids.to(device), mask.to(device)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _stop_string_end(tokenizer: PreTrainedTokenizerBase, row: list[int], stops: list[str]) -> int | None:
    """Number of tokens up to and including the first token that completes a stop string.

    A prefix that holds a stop string stays one as it grows, so the shortest is found by bisection."""
    def holds_stop(length: int) -> bool:
        return any(s in tokenizer.decode(row[:length], skip_special_tokens=True) for s in stops)
    if not row or not holds_stop(len(row)):
        return None
    return bisect.bisect_left(range(1, len(row) + 1), True, key=holds_stop) + 1


def _tail_has_stop(tokenizer: PreTrainedTokenizerBase, tokens: list[int], stops: list[str]) -> bool:
    """Whether the last tokens of a response hold a stop string (enough tokens for the longest string,
    with characters of several tokens each)."""
    window = 4 * max(len(s) for s in stops) + 8
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=True)
    return any(s in tail for s in stops)


class _ResponseStopStrings(StoppingCriteria):
    """generate's stopping criterion: a row stops when its response (after `prompt_width` columns) ends
    in a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_width: int):
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        done = [_tail_has_stop(self.tokenizer, row, self.stops) for row in input_ids[:, self.prompt_width:].tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
