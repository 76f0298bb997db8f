"""Sampling responses from a causal LM: a KV-cached loop (eager, or compiled over a static cache) that returns
the policy's log-probability of every sampled token with the tokens."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

from pmrlhf.data.tokenize import pad

SAMPLING_BATCH = 64  # prompts decoded together, unless a compiled decoding takes them all at once


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-p nucleus set to -inf (the most likely token always stays)."""
    if top_p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, -1)
    outside = probs.cumsum(-1) - probs > top_p  # tokens whose predecessors already cover top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` ``[B, V]``, drawn from that row: by the inverse of its cumulative sum, one
    uniform number per row. ``torch.multinomial`` draws an exponential for every entry instead, a large share of
    a small model's decoding step at a large vocabulary (``benchmarks/generation.py``; docs/performance.md). The
    sums run in float64, so each index's share of [0, 1) is its float32 probability to within 1e-16, and an index
    of probability 0 is never drawn."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def _decoding_mask(model, attn: torch.Tensor) -> torch.Tensor:
    """The attention mask of every decoding step, ``[B, prompt + new tokens]``, sliced to the keys seen so far.

    Eager attention gets it as the additive ``[B, 1, 1, L]`` mask that transformers would build from the 2D one
    (0 where attended, the dtype's minimum on padding), which it then takes as is: building it at every step was
    a sixth of a decoding step of a small model on CPU. Other implementations take the 2D mask.
    """
    if model.config._attn_implementation != "eager":
        return attn
    dtype = model.get_input_embeddings().weight.dtype  # transformers builds the mask in the embeddings' dtype
    return torch.zeros(attn.shape, dtype=dtype, device=attn.device).masked_fill(attn == 0, torch.finfo(dtype).min)[
        :, None, None, :
    ]


def _forward_parameters(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    return inspect.signature(base.forward).parameters


def _cache_keyword(model) -> str:
    """The name under which ``model``'s forward takes and returns its KV cache: ``cache`` since transformers 5.24,
    where ``past_key_values`` warns (and goes in 5.40); ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def _last_logits_only(model) -> dict:
    """The keyword that makes the prompt pass project only its last position onto the vocabulary, as
    transformers' ``generate`` does: the other positions' logits are never sampled from. For a 24 M-parameter
    Llama over 8,192 words and 32-token prompts, the full projection was a fifth of that pass."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}


def _reserved_cache(model, positions: int):
    """A KV cache whose layers reserve ``positions`` up front (``_ReservedLayer``), for a model whose every layer
    attends to all earlier positions; ``None`` (transformers' own cache) for sliding-window and other layouts."""
    layer_types, _ = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    if set(layer_types) != {"full_attention"}:
        return None
    return Cache(layers=[_ReservedLayer(positions) for _ in layer_types])


class _ReservedLayer(DynamicLayer):
    """One layer's keys and values in buffers of ``positions`` reserved at the prompt pass; each step writes its
    token's in place and attention gets views of the part written. transformers' ``DynamicLayer`` concatenates
    instead, copying every layer's whole cache at every step: at 64 sequences and 256 new tokens of a 6 x 256
    GPT-2 on CPU, those copies were the largest cost that grew with the length (``torch.profiler``), and
    reserving the cache took 12 % off that generation."""

    def __init__(self, positions: int):
        super().__init__()
        self.positions = positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            B, H, _, D = key_states.shape
            self.buffers = [t.new_empty(B, H, self.positions, D) for t in (key_states, value_states)]
            self.device, self.written, self.is_initialized = key_states.device, 0, True
        end = self.written + key_states.shape[-2]
        for buffer, new in zip(self.buffers, (key_states, value_states), strict=True):
            buffer[:, :, self.written : end] = new
        self.written = end
        self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
        return self.keys, self.values


class _Decoding:
    """Decoding steps of ``model`` with a KV cache reserved for the prompt and every new token: ``start`` takes
    the left-padded prompts, ``next`` one new token per sequence; both return the logits of the token to sample
    next."""

    def __init__(self, model):
        self.model, self.keyword, self.last_only = model, _cache_keyword(model), _last_logits_only(model)

    def start(self, ids: torch.Tensor, attn: torch.Tensor, position: torch.Tensor, new_tokens: int) -> torch.Tensor:
        cache = _reserved_cache(self.model, ids.shape[1] + new_tokens)
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=position,
            use_cache=True,
            **self.last_only,
            **({self.keyword: cache} if cache is not None else {}),
        )
        self.cache, self.prompt_length = out[self.keyword], ids.shape[1]
        self.mask = _decoding_mask(self.model, torch.cat([attn, attn.new_ones(ids.shape[0], new_tokens)], -1))
        return out.logits[:, -1]

    def next(self, token: torch.Tensor, position: torch.Tensor, generated: int) -> torch.Tensor:
        """Logits after feeding ``token``, the ``generated``-th new token, at ``position``."""
        return self.model(
            input_ids=token[:, None],
            attention_mask=self.mask[..., : self.prompt_length + generated],
            position_ids=position,
            use_cache=True,
            **{self.keyword: self.cache},
        ).logits[:, -1]


class CompiledDecoding:
    """Decoding steps compiled with ``torch.compile`` over a static KV cache of ``max_length`` positions.

    Every step has the same shapes, so it compiles once per batch size (seconds on a CPU) and then runs as fused
    kernels without the Python of transformers' forward around them (``benchmarks/ppo_step.py`` times both). The
    prompt pass stays eager, as prompt lengths vary.
    """

    def __init__(self, model, max_length: int):
        self.model, self.max_length, self.keyword = model, max_length, _cache_keyword(model)
        self.last_only = _last_logits_only(model)
        self.cache = self.mask = None
        self.prompt_length = 0
        self._step = torch.compile(self._forward, dynamic=False)

    def _forward(self, ids, mask, position, cache_position):
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position,
            cache_position=cache_position,
            use_cache=True,
            **{self.keyword: self.cache},
            **self.last_only,
        )
        return out.logits[:, -1]

    def start(self, ids: torch.Tensor, attn: torch.Tensor, position: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The prompt pass; logits of the first token to sample."""
        from transformers import StaticCache

        B, P = ids.shape
        if P + new_tokens > self.max_length:
            raise ValueError(f"{P} prompt and {new_tokens} new tokens exceed the {self.max_length} cache positions")
        if self.cache is None or self.mask.shape[0] != B:  # a new batch size compiles the step again
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_length)
        self.cache.reset()
        self.prompt_length = P
        self.mask = torch.cat([attn, attn.new_ones(B, self.max_length - P)], -1)
        cache_position = torch.arange(P, device=ids.device)
        return self._forward(ids, attn, position, cache_position)

    def next(self, token: torch.Tensor, position: torch.Tensor, generated: int) -> torch.Tensor:
        """Logits after feeding ``token``, the ``generated``-th new token, at ``position``."""
        cache_position = torch.full((1,), self.prompt_length + generated - 1, device=token.device)
        return self._step(token[:, None], self.mask, position, cache_position)


def generate(
    model,
    prompts: list[list[int]],
    tokenizer,
    max_new_tokens: int,
    top_p: float,
    temperature: float,
    batch_size: int = SAMPLING_BATCH,
    all_done: Callable[[torch.Tensor], bool] = lambda done: bool(done.all()),
    inference_mode: bool = True,
    decoding: CompiledDecoding | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample one response per prompt, with the policy's log-probability of every sampled token.

    A KV-cached loop over left-padded prompts: the log-probabilities of the untempered, untruncated policy
    come with the samples, so scoring needs no second actor pass. Each response ends at its first
    end-of-sequence token (kept) or at the limit; a response that is only that token is an empty text, kept
    and scored as written.

    ``all_done(done)`` says when to stop decoding, given which of this batch's sequences have ended. Where
    every forward pass is a collective (parameters sharded by FSDP), it must answer for every
    process at once, or a process that finished early would leave the others waiting.

    Sampling runs under ``torch.inference_mode()``, which has fewer per-op checks than ``no_grad`` (only Python
    lists leave this function). Sharded parameters need ``inference_mode=False``: FSDP gathers them into buffers
    that it reuses in the training passes, and inference mode would mark those buffers read-only there.

    ``decoding`` runs the steps after the prompt through a ``CompiledDecoding`` of ``model``, with every prompt in
    one batch: one shape, compiled once.

    The model samples in evaluation mode and is handed back in the mode it came in: in training mode with
    activation checkpointing, transformers would drop the KV cache.
    """
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.inference_mode(inference_mode):
            return _generate(
                model, prompts, tokenizer, max_new_tokens, top_p, temperature, batch_size, all_done, decoding
            )
    finally:
        model.train(training)


def _generate(model, prompts, tokenizer, max_new_tokens, top_p, temperature, batch_size, all_done, decoding):
    device = next(model.parameters()).device
    eos, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses: list[list[int]] = []
    logps: list[list[float]] = []
    if decoding is not None:
        batch_size = len(prompts)
    else:
        decoding = _Decoding(model)
    for s in range(0, len(prompts), batch_size):
        ids, attn = (t.to(device) for t in pad(prompts[s : s + batch_size], pad_id, "left"))
        B = ids.shape[0]
        position = (attn.cumsum(-1) - 1).clamp(min=0)
        step_logits = decoding.start(ids, attn, position, max_new_tokens)
        next_position = position[:, -1:] + 1
        tokens, token_logp = [], []
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = step_logits.float()
            sample_logits = _nucleus(logits / temperature, top_p)
            token = draw(torch.softmax(sample_logits, -1))
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens.append(token)
            token_logp.append(torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1))
            done = done | (token == eos)
            if len(tokens) == max_new_tokens or all_done(done):  # no forward pass whose logits go unused
                break
            step_logits = decoding.next(token, next_position, len(tokens))
            next_position = next_position + 1
        for row, lp in zip(torch.stack(tokens, 1).tolist(), torch.stack(token_logp, 1).tolist(), strict=True):
            cut = row.index(eos) + 1 if eos in row else len(row)
            responses.append(row[:cut])
            logps.append(lp[:cut])
    return responses, logps
