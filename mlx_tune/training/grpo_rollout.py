"""GRPO's data side: prompt rows in a resumable order, completions sampled with the live
adapter, and the per-token log-probabilities of those completions.

Prompt rows are ``{"prompt": str}`` or ``{"messages": [...]}`` plus any other columns
(``data_transform.py --to prompts`` writes them; ``data.preference.convert_prompts``
checks each row here too). ``PromptOrder`` shuffles them once per epoch from
``(seed, epoch)``, so its state is two integers.

``sample`` decodes every row of a generation batch together through mlx-lm's
``BatchGenerator`` (the continuous batcher the server's engine drives) on the model
being trained, no copy of the weights: dropout off, on the CPU backend the server's
layers swapped in for the duration (``evaluation.live.serving_layers``), and each
completion drawn with the server's sampler (``temperature``, ``top_p``) keyed by its own
seed, so the same seeds give the same completions whatever else is in the batch. The
EOS token that ends a completion is part of it (TRL trains on it too).

``completion_logps``: ``log p(c_j) = logits[p + j - 1, c_j] - logsumexp(logits[p + j -
1])``, the head applied to the hidden states of the completion positions only, divided by
the sampling temperature first (TRL's ``logits / temperature``: the loss is about the
distribution the completions were drawn from), over ``model_rows``: a group's prompt once,
its completions after it in one row (``shared_rows``), where the model allows packed rows.
Sampling, likewise, prefills each distinct prompt once for all its generations (the KV
cache copied per row, as the server's ``n`` answers share one prefill). ``reference`` disables every LoRA
layer (``LoRALinear.enabled = False``) for the reference model of the KL term.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_tune.errors import UserError


def read_prompt_rows(path: str | Path, max_errors: int = 20) -> list[dict]:
    """The prompt rows of a JSONL file, normalised; bad rows raise one ``UserError`` (file:line)."""
    from mlx_tune.data.preference import convert_prompts
    from mlx_tune.data.readers import bad_records, convert_jsonl

    def convert(_line: int, value: Any) -> dict:
        if type(value) is dict and "completion" in value:
            raise ValueError("a row with a 'completion' is SFT data; GRPO needs prompt-only rows")
        return convert_prompts(value)[0]

    rows, _lines, errors = convert_jsonl(path, convert)  # RecordError is a ValueError
    if errors:
        raise bad_records(path, errors, "prompt row(s)", max_errors=max_errors, one_line=True)
    if not rows:
        raise UserError(f"{path}: no prompt rows; write them with data_transform.py --to prompts")
    return rows


@dataclass
class PromptOrder:
    """``take(k)``: the next ``k`` row indices; a new shuffle of ``(seed, epoch)`` each epoch."""

    n: int
    seed: int
    epoch: int = 0
    index: int = 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
            perm = self._perm()
            got = perm[self.index: self.index + k - len(out)].tolist()
            out += got
            self.index += len(got)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n:
            raise UserError(f"train.resume: the checkpoint saw {state.get('n')} prompt rows, the data has {self.n}; "
                            "resume needs the same train.jsonl (or start a new output_dir)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def encode_prompt(tokenizer, row: dict) -> list[int]:
    """The prompt tokens, as the server encodes them (chat template + generation prompt)."""
    from mlx_tune.evaluation.live import encode_row
    from mlx_tune.evaluation.prompts import PromptRow

    return encode_row(tokenizer, PromptRow(0, prompt=row.get("prompt"), messages=row.get("messages")))


def completion_seed(seed: int, generation: int, row: int) -> int:
    """The sampling seed of completion ``row`` of generation batch ``generation``."""
    return int(np.random.SeedSequence([seed, generation, row]).generate_state(1)[0])


@dataclass
class Completion:
    ids: list[int]
    ended: bool  # finished with EOS (False: cut at max_completion_length)
    logps: list[float] | None = None  # the sampler's log p of each token at the temperature (``sample(logps=True)``)


def sample(model, tokenizer, prompts: list[list[int]], seeds: list[int], *, max_tokens: int, temperature: float,
           top_p: float, max_batch: int = 64, swap_budget: int | None = 2**30, logps: bool = False
           ) -> list[Completion]:
    """One completion per (prompt, seed), decoded together with the model's live adapter;
    ``logps``: also the log-prob of each drawn token under the distribution it was drawn from
    (the generator's log-softmax at ``temperature``, before ``top_p``), to check the training
    side's ``completion_logps`` against."""
    from mlx_lm.generate import BatchGenerator

    from mlx_tune.evaluation.live import serving_layers
    from mlx_tune.server.engine import GenRequest
    from mlx_tune.server.sampling import make_request_sampler

    eos = sorted(set(tokenizer.eos_token_ids or ()))
    was_training = model.training
    model.eval()
    out: list[Completion | None] = [None] * len(prompts)
    ids: dict[int, list[int]] = {}
    lps: dict[int, list[float]] = {}
    inv_temp = 1.0 / temperature if temperature > 0 else 1.0
    layers = serving_layers(model, swap_budget) if swap_budget is not None else contextlib.nullcontext()
    try:
        with layers, _batch_cache_step(max_tokens):
            gen = BatchGenerator(model, stop_tokens=[[t] for t in eos], completion_batch_size=max_batch,
                                 prefill_batch_size=min(8, max_batch), stream=mx.default_stream(mx.default_device()))
            samplers = [make_request_sampler(GenRequest(prompt=p, adapter=None, max_tokens=max_tokens,
                                                        temperature=temperature, top_p=top_p, seed=s))
                        for p, s in zip(prompts, seeds)]
            caches = _shared_prefills(model, prompts)
            uids = gen.insert([p[len(c[1]):] for p, c in zip(prompts, caches)], max_tokens=[max_tokens] * len(prompts),
                              samplers=samplers, caches=[c[0] for c in caches], all_tokens=[c[1] for c in caches])
            where = {uid: i for i, uid in enumerate(uids)}
            left = len(uids)
            while left:
                for r in gen.next_generated():
                    ids.setdefault(r.uid, []).append(int(r.token))
                    if logps:
                        z = r.logprobs * inv_temp
                        lps.setdefault(r.uid, []).append((z[int(r.token)] - mx.logsumexp(z)).item())
                    if r.finish_reason is not None:
                        out[where[r.uid]] = Completion(ids[r.uid], r.finish_reason == "stop" and r.token in eos,
                                                       lps.get(r.uid) if logps else None)
                        left -= 1
            gen.close()
    finally:
        model.train(was_training)
    return [c if c is not None else Completion([], False) for c in out]


@contextlib.contextmanager
def _batch_cache_step(max_tokens: int):
    """The batch KV cache grows ``max_tokens + 1`` rounded up to 16 at a time (at most mlx-lm's
    256): completions of 12 tokens for 32 rows then take 16 slots a row instead of 256, which
    was 0.33 GB of the demo's 0.47 GB generation peak. Restored afterwards."""
    from mlx_lm.models.cache import BatchKVCache

    before = BatchKVCache.step
    BatchKVCache.step = min(before, -(-(max_tokens + 1) // 16) * 16)
    try:
        yield
    finally:
        BatchKVCache.step = before


def _shared_prefills(model, prompts: list[list[int]]) -> list[tuple[list, list[int]]]:
    """``(KV cache or None, tokens in it)`` per row: a prompt (all but its last token) that
    several rows share is computed once and copied into each of them, as the server does for
    ``n`` answers; the others are left to the generator's batched prefill."""
    import copy
    from collections import Counter

    from mlx_lm.models.cache import KVCache

    from mlx_tune.server.prefix_cache import prefill

    repeats = Counter(tuple(p[:-1]) for p in prompts)
    done: dict[tuple[int, ...], list] = {}
    out: list = []
    for p in prompts:
        key = tuple(p[:-1])
        if not key or repeats[key] == 1:  # a prompt of its own: the generator's batched prefill does it
            out.append((None, []))
            continue
        if key not in done:
            done[key] = _compact(prefill(model, list(key)))
        # The generator only reads a row's cache (merging it into its batch cache), and a full
        # KV cache grows into new arrays, so plain KV caches share one compact copy; others
        # (rotating windows, recurrent state) are copied per row.
        out.append(([copy.copy(c) if type(c) is KVCache else copy.deepcopy(c) for c in done[key]], list(key)))
    return out


def _compact(cache: list) -> list:
    """Each plain KV cache cut to the tokens it holds (a prefill leaves room for 256 more)."""
    from mlx_lm.models.cache import KVCache

    for c in cache:
        if type(c) is KVCache and c.keys is not None and c.keys.shape[2] != c.offset:
            k, v = c.keys_and_values()
            c.keys, c.values = mx.contiguous(k), mx.contiguous(v)
    mx.eval([c.state for c in cache])
    return cache


@dataclass
class Rows:
    """The model inputs of a micro-batch of ``N`` completions and where their log-probs come
    from: ``inputs`` (B, L) with optional packing arrays (``segment_ids``, ``positions``,
    ``prefix_ids``, see ``model.attention.packed_mask``); ``gather[n, j]``, a flat index into
    the (B * L) positions, is the position whose logits predict completion token ``j`` of
    completion ``n``; ``comp`` (N, T) those tokens, ``mask`` (N, T) 1.0 where one exists."""

    inputs: mx.array
    comp: mx.array
    mask: mx.array
    gather: mx.array
    segment_ids: mx.array | None = None
    positions: mx.array | None = None
    prefix_ids: mx.array | None = None


def _completion_arrays(completions: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    t = max(1, max(len(c) for c in completions))
    comp = np.full((len(completions), t), pad_id, np.int32)
    mask = np.zeros((len(completions), t), np.float32)
    for b, c in enumerate(completions):
        comp[b, : len(c)] = c
        mask[b, : len(c)] = 1
    return comp, mask, t


def pad_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0) -> Rows:
    """One row ``prompt + completion`` per completion, right-padded to one length (causal
    attention, so padding after a row changes nothing before it)."""
    comp, mask, t = _completion_arrays(completions, pad_id)
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    width = max(1, length - 1)  # the last token of a row is predicted, never an input
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    gather = np.zeros((len(prompts), t), np.int32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        row = (p + c)[:width]
        tokens[b, : len(row)] = row
        gather[b] = b * width + np.minimum(len(p) - 1 + np.arange(t), width - 1)
    return Rows(mx.array(tokens), mx.array(comp), mx.array(mask), mx.array(gather))


def shared_rows(prompts: list[list[int]], completions: list[list[int]], pad_id: int = 0,
                multiple: int = 16) -> Rows:
    """One row per distinct prompt, ``[prompt | c_1[:-1] | c_2[:-1] | ...]``: the prompt once,
    each of its completions after it as its own segment that sees the prompt (``prefix_ids``)
    and not the other completions, at the positions it has after the prompt alone. So
    ``log p(c_k | prompt)`` is what ``pad_rows`` gives, with ``len(prompt)`` tokens run once
    per group instead of once per completion (GRPO's 8 completions of a 50-token prompt: 146
    positions instead of 496). Completion token 0 is predicted by the prompt's last position,
    which all of the group share; rows are padded to ``multiple``."""
    comp, mask, t = _completion_arrays(completions, pad_id)
    groups: dict[tuple[int, ...], list[int]] = {}
    for n, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(n)
    lengths = [len(p) + sum(max(len(completions[n]) - 1, 0) for n in members) for p, members in groups.items()]
    width = -(-max(lengths) // multiple) * multiple
    B = len(groups)
    tokens = np.full((B, width), pad_id, np.int32)
    seg = np.full((B, width), -1, np.int32)  # -1: padding (its own segment)
    prefix = np.full((B, width), -1, np.int32)
    pos = np.zeros((B, width), np.int32)
    gather = np.zeros((len(prompts), t), np.int32)
    for b, (p, members) in enumerate(groups.items()):
        P = len(p)
        tokens[b, :P], seg[b, :P], prefix[b, :P], pos[b, :P] = p, 0, 0, np.arange(P)
        at = P
        for k, n in enumerate(members, start=1):
            c = completions[n]
            m = max(len(c) - 1, 0)
            tokens[b, at: at + m], seg[b, at: at + m], prefix[b, at: at + m] = c[:-1], k, 0
            pos[b, at: at + m] = P + np.arange(m)
            # token 0 <- the prompt's last position; token j >= 1 <- this segment's position j - 1
            idx = np.concatenate([[P - 1], at + np.arange(m), np.full(t - 1 - m, at + m - 1 if m else P - 1)])
            gather[n] = b * width + idx[:t]
            at += m
        pos[b, at:] = np.arange(width - at)
    return Rows(mx.array(tokens), mx.array(comp), mx.array(mask), mx.array(gather), mx.array(seg), mx.array(pos),
                mx.array(prefix))


def model_rows(model, prompts: list[list[int]], completions: list[list[int]]) -> Rows:
    """``shared_rows`` where some prompt has several completions and the model takes such
    rows (``packing.shares_prefix``); else ``pad_rows``."""
    from mlx_tune.model.packing import packing_support, shares_prefix

    if len({tuple(p) for p in prompts}) == len(prompts) or packing_support(model) is not None:
        return pad_rows(prompts, completions)
    rows = shared_rows(prompts, completions)
    return rows if shares_prefix(model, rows.inputs.shape[1]) else pad_rows(prompts, completions)


def completion_logps(model, rows: Rows, temperature: float = 1.0, with_grad: bool = True) -> mx.array:
    """``log p(completion token j | everything before it)`` per completion, (N, T) float32,
    of the policy at ``temperature`` (logits / temperature, as TRL scores the completions it
    sampled): ``log p(c_j) = z[c_j] - logsumexp(z)`` with ``z`` the logits at ``gather[n, j]``
    over ``T``, the head applied to those positions only (no logits for the prompts).

    Where the model's logit map is linear (no softcap), ``(s W h) / T = s W (h / T)``, so the
    log-probs are ``-token_ce`` of ``h / T``: the fused per-token head, with no (N, T, vocab)
    logits held for the backward pass. A softcapped head (Gemma 2) takes the plain route.
    ``with_grad=False``: forward only (old and reference log-probs).
    """
    from mlx_tune.model import head
    from mlx_tune.model.attention import hidden_states
    from mlx_tune.training.losses import token_ce

    h = hidden_states(model, rows.inputs, rows.segment_ids, rows.positions, rows.prefix_ids)
    N, T = rows.comp.shape
    h = h.reshape(-1, h.shape[-1])[rows.gather.reshape(-1)]  # (N * T, hidden)
    if not head.logit_map(model).cap:
        scaled = h if temperature == 1.0 else h * (1.0 / temperature)
        return -token_ce(model, scaled, rows.comp.reshape(-1), with_grad=with_grad).reshape(N, T)
    picked = head.logits(model, h).astype(mx.float32)  # (N * T, V)
    if temperature != 1.0:
        picked = picked * (1.0 / temperature)
    chosen = mx.take_along_axis(picked, rows.comp.reshape(-1)[:, None], axis=-1)[:, 0]
    return (chosen - mx.logsumexp(picked, axis=-1)).reshape(N, T)


def lora_layers(model: nn.Module) -> list[Any]:
    from mlx_tune.adapters.lora import LoRALinear

    return [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def reference(model: nn.Module):
    """The base model for the duration: every LoRA layer disabled, then restored."""
    layers = lora_layers(model)
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.enabled = flag
