"""The embedded rollout engine: batched sampling with the model's own KV cache, in plain PyTorch.

Used on CPU, in tests, and on GPU when vLLM is not wanted. One `generate` call expands the prompts into
len(prompts) * n requests, sorts them by prompt length (longest first, so similar lengths share a prefill)
and decodes them in `max_batch_size` slots with continuous refill:
  - a slot's request starts with a right-padded prefill (`input_lengths`) of the new prompts only, into a
    small cache whose rows are then copied into the slots of the shared KV cache;
  - each step decodes one token for every active slot;
  - every `check_every` steps (default 8) the host syncs once: it checks stop strings on the new tokens,
    collects finished responses and hands their slots to waiting requests; it also checks at the step by
    which some slot must have spent its token budget. A slot that finishes in between idles until then
    (its cache does not advance): a little wasted compute, never a changed result.
All per-row state (finished, generated length, token budget) lives on the device; the checks are the only
host syncs of the loop.

Results do not depend on batching or refill order: each request's randomness is a hash of (seed, prompt
id, sample index, token index) (see sampling.py), and a row's numbers depend only on its own tokens (up to
floating-point reassociation).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grpo_core.rollout.base import Generation, RolloutEngine, SamplingParams, check_requests
from grpo_core.rollout.sampling import request_keys, sample_tokens, step_keys
from grpo_core.rollout.stop_strings import StopStringMatcher


class TorchRolloutEngine(RolloutEngine):
    """Generates with a `grpo_core.model.CausalLM` (or anything with the same forward / KV-cache API).

    model: the engine's model (used as is; see `from_model_copy` for a private copy).
    tokenizer: needed for `text`, stop strings and the default eos stop token; optional otherwise.
    max_batch_size: rows decoded together (bounds KV-cache memory: rows x (prompt + new tokens)).
    device: where to run; default the model's device (the model is moved there).
    release_on_sleep: let `sleep` free the model's weights until the next full `load_weights` (for a model
        the engine owns, as the trainer's inference copy; default False, True in `from_model_copy`).
    check_every: decode steps between the host syncs that collect finished rows, refill their slots and
        check stop strings.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer=None,
        max_batch_size: int = 64,
        device: torch.device | str | None = None,
        check_every: int = 8,
        release_on_sleep: bool = False,
    ):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        for attr in ("new_kv_cache", "lm_head"):
            if not hasattr(model, attr):
                raise TypeError(f"model {type(model).__name__} has no `{attr}`; expected a grpo_core CausalLM")
        if device is not None:
            model = model.to(device)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.check_every = check_every
        self.release_on_sleep = bool(release_on_sleep)
        self._asleep = False
        self._shapes: dict[str, torch.Size] = {}  # parameter shapes while asleep (storage freed)

    @classmethod
    def from_model_copy(cls, model: nn.Module, **kwargs) -> "TorchRolloutEngine":
        """An engine over a deep copy of a plain (not ZeRO-partitioned) model, so training never touches it.
        The engine owns the copy, so by default its sleep() frees the copy's weights."""
        kwargs.setdefault("release_on_sleep", True)
        return cls(copy.deepcopy(model), **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The model's max_position_embeddings (prompt + generated tokens), or None if it has none."""
        args = getattr(self.model, "args", None) or getattr(self.model, "config", None)
        return getattr(args, "max_position_embeddings", None)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy weights (HF names, e.g. `model.layers.0.mlp.up_proj.weight`) into the engine's model.

        Tensors are copied one at a time as the iterable yields them, so a trainer can stream ZeRO-3-gathered
        parameters without holding them all. Strict: every name must exist with the same shape, and every
        state-dict entry must be given once the iterable ends (of tied aliases such as `lm_head.weight` /
        `model.embed_tokens.weight`, one is enough). Dtype and device are converted. Wakes a sleeping engine
        (its parameters are re-allocated first; the strict check guarantees every one is then written).
        """
        if self._asleep:
            self._allocate_parameters()
        state = self.model.state_dict()
        # Tied weights appear under several names sharing one storage; any one name loads them all.
        alias_group: dict[str, tuple] = {
            name: (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) for name, t in state.items()
        }
        loaded_groups = set()
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"load_weights: {name!r} is not a weight of the engine's model "
                               f"(it has e.g. {sorted(state)[:3]})")
            target = state[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"load_weights: {name!r} has shape {list(tensor.shape)}, "
                                 f"the engine's model expects {list(target.shape)}")
            target.copy_(tensor)
            loaded_groups.add(alias_group[name])
        missing = sorted(n for n, g in alias_group.items() if g not in loaded_groups)
        if missing:
            raise ValueError(f"load_weights: {len(missing)} weights were not given, e.g. {missing[:5]}")
        self._asleep = False

    def sync_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        self.load_weights(named_tensors)

    # ------------------------------------------------------------------ sleep (between rollouts)
    def sleep(self) -> None:
        """With release_on_sleep (a model the engine owns): free the parameters' memory while the trainer
        updates, like vLLM's sleep level 2. Every weight is re-sent by the next sync anyway, so nothing is
        copied out; buffers (e.g. rotary tables) stay. Otherwise a no-op: the model may be the caller's."""
        if self.model is None or self._asleep or not self.release_on_sleep:
            return
        for name, param in self.model.named_parameters():  # tied weights: one Parameter, listed once
            self._shapes[name] = param.shape
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self._asleep = True

    def wake_up(self) -> None:
        """Nothing to re-acquire without weights: a sleeping engine wakes in `sync_weights`."""
        if self._asleep:
            raise RuntimeError("TorchRolloutEngine is asleep (its weights were freed): sync weights to wake it")

    def _allocate_parameters(self) -> None:
        for name, param in self.model.named_parameters():
            param.data = torch.empty(self._shapes[name], dtype=param.dtype, device=param.device)

    def close(self) -> None:
        self.model = None

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, request_ids: list[int] | None = None
    ) -> list[Generation]:
        """Sample params.n responses per prompt; returns Generations ordered prompt-major (see base.py)."""
        if self.model is None:
            raise RuntimeError("generate called on a closed TorchRolloutEngine")
        if self._asleep:
            raise RuntimeError("generate called on a sleeping TorchRolloutEngine (weights freed): sync weights first")
        prompt_keys = check_requests(prompts, request_ids)
        stop_ids = params.stop_token_ids
        if stop_ids is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            stop_ids = [] if eos is None else [eos]
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("SamplingParams.stop_strings need a tokenizer: build the engine with tokenizer=...")
        max_pos = self.max_positions
        if max_pos is not None:
            for i, prompt in enumerate(prompts):
                if len(prompt) >= max_pos:
                    raise ValueError(f"prompts[{i}] has {len(prompt)} tokens but the model's max_position_embeddings "
                                     f"is {max_pos}: no room to generate (prompt + new tokens must fit)")
        requests = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        if not requests:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                outputs = _Decoder(self, prompts, prompt_keys, requests, params, stop_ids, max_pos).run()
        finally:
            self.model.train(was_training)
        return [self._make_generation(req, *out, params) for req, out in zip(requests, outputs)]

    def _make_generation(self, request, token_ids, logprobs, reason, params) -> Generation:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            if reason == "stop" and params.stop_strings:
                cuts = [i for i in (text.find(s) for s in params.stop_strings) if i >= 0]
                if cuts:
                    text = text[:min(cuts)]
        return Generation(prompt_index=request[0], sample_index=request[1], token_ids=token_ids,
                          logprobs=logprobs, finish_reason=reason, text=text)


class _Decoder:
    """The state of one generate call: slots, the shared KV cache, per-slot device state, the request queue."""

    def __init__(self, engine: TorchRolloutEngine, prompts, prompt_keys, requests, params: SamplingParams,
                 stop_ids: list[int], max_pos: int | None):
        model, dev = engine.model, engine.device
        self.model, self.dev, self.params, self.check_every = model, dev, params, engine.check_every
        self.prompts = [prompts[p] for p, _ in requests]
        self.identity = [(prompt_keys[p], s) for p, s in requests]
        self.budget = [params.max_new_tokens if max_pos is None else min(params.max_new_tokens, max_pos - len(p))
                       for p in self.prompts]
        # Longest prompts first: similar lengths prefill together, and running out of memory happens at once.
        self.queue = sorted(range(len(requests)), key=lambda r: (-len(self.prompts[r]), r))
        self.queue.reverse()  # so that pop() takes the next one
        self.pad_id = getattr(engine.tokenizer, "pad_token_id", None) or 0
        rows = min(engine.max_batch_size, len(requests))
        max_new = max(self.budget)
        # A finished slot's cache stops advancing, so a slot holds at most prompt + budget - 1 tokens.
        self.cache = model.new_kv_cache(rows, max(len(p) + b for p, b in zip(self.prompts, self.budget)), device=dev)
        # The head runs in fp32 so sampling and logprobs match the trainer's fp32 kernel; one cast per call
        # (a no-op for an fp32 model), always of the current weights.
        self.head_weight = model.lm_head.weight.float()
        self.stop_t = torch.tensor(stop_ids, dtype=torch.long, device=dev)
        self.tokens = torch.full((rows, max_new), self.pad_id, dtype=torch.long, device=dev)  # response per slot
        self.logprobs = torch.zeros((rows, max_new), dtype=torch.float32, device=dev)
        self.finished = torch.ones(rows, dtype=torch.bool, device=dev)  # empty slots count as finished
        self.stopped = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.gen_len = torch.zeros(rows, dtype=torch.long, device=dev)
        self.budget_t = torch.zeros(rows, dtype=torch.long, device=dev)
        self.keys = torch.zeros(rows, dtype=torch.long, device=dev)
        self.last_token = torch.full((rows,), self.pad_id, dtype=torch.long, device=dev)
        self.slot_request = [-1] * rows  # host: request held by each slot, -1 = free
        self.deadline = [0] * rows  # host: step by which the slot has surely spent its budget
        self.matcher = (StopStringMatcher(engine.tokenizer, params.stop_strings, rows)
                        if params.stop_strings else None)
        self.outputs: list[tuple | None] = [None] * len(requests)

    def run(self) -> list[tuple[list[int], list[float], str]]:
        """Decode every request; returns (token_ids, logprobs, finish_reason) per request, in request order."""
        rows = len(self.slot_request)
        arange = torch.arange(rows, device=self.dev)
        step, next_check = 0, self.check_every
        new_slots = self._assign(list(range(rows)))
        decoding = False  # host: does any slot besides the new ones hold a request?
        while True:
            # Feed: the last token of every slot that is still decoding, then the prompts of newly filled slots.
            hidden = None
            if decoding:
                hidden = self.model(self.last_token[:, None], kv_cache=self.cache,
                                    input_lengths=(~self.finished).long())[:, -1]
            if new_slots:
                hidden = self._prefill(new_slots, hidden)
                for b in new_slots:
                    self.deadline[b] = step + self.budget[self.slot_request[b]]
                next_check = min(next_check, min(self.deadline[b] for b in new_slots))
            decoding = True  # every slot sampled from now holds a request until the next check says otherwise
            # Sample token number gen_len of every active slot.
            logits = F.linear(hidden.float(), self.head_weight)  # [rows, V] fp32
            tok, lp = sample_tokens(logits, step_keys(self.keys, self.gen_len), temperature=self.params.temperature,
                                    top_k=self.params.top_k, top_p=self.params.top_p)
            active = ~self.finished
            col = self.gen_len.clamp(max=self.tokens.shape[1] - 1)
            self.tokens[arange, col] = torch.where(active, tok, self.tokens[arange, col])
            self.logprobs[arange, col] = torch.where(active, lp, self.logprobs[arange, col])
            self.last_token = tok
            self.gen_len += active
            hit_stop = (active & torch.isin(tok, self.stop_t)) if self.stop_t.numel() else torch.zeros_like(active)
            self.stopped |= hit_stop
            self.finished |= hit_stop | (self.gen_len >= self.budget_t)
            step += 1
            new_slots = []
            if step >= next_check:  # the only host syncs of the loop
                free = self._collect()
                if all(r < 0 for r in self.slot_request) and not self.queue:
                    return self.outputs
                busy = [b for b, r in enumerate(self.slot_request) if r >= 0]
                decoding = bool(busy)
                new_slots = self._assign(free)
                next_check = min([step + self.check_every] + [self.deadline[b] for b in busy])

    def _assign(self, free: list[int]) -> list[int]:
        """Give free slots to waiting requests (host bookkeeping; device state is set in _prefill)."""
        filled = []
        for b in free:
            if not self.queue:
                break
            self.slot_request[b] = self.queue.pop()
            filled.append(b)
        return filled

    def _prefill(self, slots: list[int], hidden):
        """Prefill the prompts of `slots` into a small cache, copy its rows into those slots of the shared
        cache, reset the slots' state. Returns the hidden state [rows, D] to sample from for every slot."""
        reqs = [self.slot_request[b] for b in slots]
        lens = [len(self.prompts[r]) for r in reqs]
        width = max(lens)
        ids = torch.full((len(slots), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, :lens[i]] = torch.as_tensor(self.prompts[r], dtype=torch.long)
        idx = torch.tensor(slots, dtype=torch.long, device=self.dev)
        lens_t = torch.tensor(lens, dtype=torch.long, device=self.dev)
        small = self.model.new_kv_cache(len(slots), width, dtype=self.cache.dtype, device=self.dev)
        out = self.model(ids.to(self.dev), kv_cache=small, input_lengths=lens_t)
        out = out[torch.arange(len(slots), device=self.dev), lens_t - 1]  # [n, D] at each last prompt token
        self.cache.k[:, idx, :width] = small.k[:, :, :width]
        self.cache.v[:, idx, :width] = small.v[:, :, :width]
        self.cache.lengths[idx] = small.lengths
        if hidden is None:
            hidden = out.new_zeros((len(self.slot_request), out.shape[-1]))
        hidden[idx] = out
        ident = torch.tensor([self.identity[r] for r in reqs], dtype=torch.long, device=self.dev)
        self.keys[idx] = request_keys(self.params.seed, ident[:, 0], ident[:, 1])
        self.budget_t[idx] = torch.tensor([self.budget[r] for r in reqs], dtype=torch.long, device=self.dev)
        self.gen_len[idx] = 0
        self.finished[idx] = False
        self.stopped[idx] = False
        if self.matcher is not None:
            self.matcher.reset(slots)
        return hidden

    def _collect(self) -> list[int]:
        """Host sync: apply stop strings, store finished responses, return the freed slots."""
        finished, stopped, gen_len = torch.stack([self.finished, self.stopped, self.gen_len]).tolist()
        busy = [b for b, r in enumerate(self.slot_request) if r >= 0]
        if self.matcher is not None:
            # Stopped rows too: a stop string may complete before the stop token within the unscanned steps.
            hits = self.matcher.scan(self.tokens, gen_len, busy)
            if hits:
                idx = torch.tensor([b for b, _ in hits], dtype=torch.long, device=self.dev)
                self.gen_len[idx] = torch.tensor([n for _, n in hits], dtype=torch.long, device=self.dev)
                self.finished[idx] = True
                self.stopped[idx] = True
                for b, n in hits:
                    finished[b], stopped[b], gen_len[b] = True, True, n
        done = [b for b in busy if finished[b]]
        if done:
            tokens, logprobs = self.tokens[done].tolist(), self.logprobs[done].tolist()
            for b, row_tokens, row_logprobs in zip(done, tokens, logprobs):
                n = gen_len[b]
                reason = "stop" if stopped[b] else "length"
                self.outputs[self.slot_request[b]] = (row_tokens[:n], row_logprobs[:n], reason)
                self.slot_request[b] = -1
        return [b for b, r in enumerate(self.slot_request) if r < 0]
