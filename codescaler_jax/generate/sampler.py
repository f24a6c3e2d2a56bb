"""Policy sampling for GRPO rollouts: a jit-compiled decode loop over a static KV cache.

``JaxSampler`` turns prompts (token lists) into responses. Prompts are left-padded to a length
bucket, prefilled in one forward pass (or ``prefill_chunk`` tokens at a time), then a
``jax.lax.while_loop`` decodes one token per step on device (no host round trip per token)
until every row has stopped or ``max_new_tokens`` is reached. A row stops at an EOS id or when
its last tokens equal one of the configured stop sequences; what comes after is padding (token
``pad_token_id``, log-prob 0). The loop is jitted with the parameters on the mesh (heads on
``tensor``, ``embed`` on ``fsdp``) and the batch, the KV cache and the outputs split over
``('data', 'fsdp')``.

Sampling per step: ``logits / temperature`` -> keep the ``top_k`` largest -> keep the smallest
set of the (renormalised) remaining tokens whose probability reaches ``top_p`` (the nucleus;
the most likely token is always kept; found without sorting the vocabulary when there is no
top-k) -> draw. ``greedy`` takes the argmax instead. The order
(temperature, top-k, top-p) is that of vLLM and ``transformers``.

Returned log-probs are ``log_softmax(logits / temperature)`` of each drawn token (temperature 1
when greedy), i.e. under the temperature-scaled policy *before* top-k/top-p truncation. That is
the distribution the GRPO update recomputes and trains (verl divides the actor's logits by the
rollout temperature), so rollout and actor log-probs are directly comparable.

Stop strings are matched as token sequences: ``stop_sequences_from_strings`` encodes each
string with the policy tokenizer. A stop string that the policy spells with other tokens is not
caught on device; that is the price of a per-token check without a host round trip.

``Sampler`` is the small interface the trainer uses (``load_params`` then ``generate``), and
the trainer builds its engine by name from ``SAMPLERS`` (config ``rollout.engine``), so an
external engine (e.g. vLLM-TPU, which needs a weight sync in ``load_params``) is one registered
factory away, without touching the trainer.

Multi-host (``jax.distributed``): each process passes ``generate`` its own prompts, the same
number on every process, and gets back the responses of those rows only. Each decode loop's
global batch is built from ``batch_size / process_count`` rows of every process
(``jax.make_array_from_process_local_data``) and each process fetches only its addressable
rows; the processes agree on the padded prompt length first. Loop ``c`` draws with
``fold_in(rng, c)`` over its global rows, so when a call fits one loop (``batch_size`` >= the
rows of all processes) the tokens equal those of one process sampling every row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codescaler_jax.distributed import global_max, local_rows, rows_to_global
from codescaler_jax.models.qwen3 import Qwen3ForCausalLM
from codescaler_jax.models.sharding import batch_sharding, param_shardings, tree_shardings
from codescaler_jax.registry import SAMPLERS

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Hashable: it is a static argument of the jitted decode loop.

    Attributes:
        max_new_tokens: response budget per row (the reference uses 16,384).
        temperature: logits are divided by it before sampling (ignored when ``greedy``).
        top_p: nucleus mass in (0, 1]; 1 disables.
        top_k: keep the k most likely tokens; 0 disables.
        greedy: take the argmax (``transformers`` ``do_sample=False``).
        eos_token_ids: a row stops after emitting any of these (the token is kept).
        stop_sequences: token-id sequences; a row stops once its response ends with one.
        pad_token_id: fills the positions after a row stopped.
        prefill_chunk: write the prompt into the cache this many tokens at a time
            (``Qwen3ForCausalLM.prefill``); None: one forward over the whole prompt.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    eos_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    pad_token_id: int = 0
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(
            self, "stop_sequences", tuple(tuple(int(t) for t in s) for s in self.stop_sequences)
        )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or greedy=True), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 or None, got {self.prefill_chunk}")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError("stop_sequences must not contain an empty sequence")

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the returned log-probs (1 for greedy)."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclasses.dataclass
class SampleOutput:
    """Responses of one ``generate`` call (host numpy arrays, one row per prompt).

    Attributes:
        tokens: ``[B, max_new_tokens]`` int32, ``pad_token_id`` after each row's end.
        logprobs: ``[B, max_new_tokens]`` float32, 0 after each row's end.
        lengths: ``[B]`` int32 response lengths, the EOS / stop tokens included.
        stopped: ``[B]`` bool, True when the row ended at EOS or a stop sequence (False:
            truncated at ``max_new_tokens``).
        prompt_len: the padded prompt length P that was used (a bucket).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    prompt_len: int


class Sampler(Protocol):
    """What the GRPO trainer needs from a rollout engine."""

    config: SamplingConfig

    def load_params(self, params: Any) -> None:
        """Use these policy parameters for the next ``generate`` calls (a weight sync)."""

    def generate(self, prompts: Sequence[Sequence[int]], rng: jax.Array) -> SampleOutput:
        """Sample one response per prompt (token-id lists); rows in the order given."""


# ---- per-step token choice --------------------------------------------------------------------


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0):
    """Top-k then top-p truncation of (temperature-scaled) logits.

    Args:
        logits: ``[B, V]`` float32.
        top_k: keep the k largest (0: all).
        top_p: then keep the smallest prefix (by decreasing probability, renormalised after
            top-k) whose mass reaches ``top_p``; the first token is always kept.

    Returns:
        ``(candidate_logits [B, K], candidate_ids [B, K])``: ``-inf`` where a candidate is
        filtered out; ``K = top_k`` when set (sorted), else ``V`` (vocabulary order).

    With ``top_k`` the nucleus is cut on the k sorted candidates. Without it, sorting the
    vocabulary costs far more than the model step on CPU (measured: 450 ms for 8 x 151,936),
    so the nucleus is found as a probability threshold instead (``nucleus_threshold``): the
    same set, except that tokens tied exactly at the boundary are kept or dropped together.
    """
    b, v = logits.shape
    if top_k and top_k < v:
        vals, ids = jax.lax.top_k(logits, top_k)
        if top_p < 1.0:
            probs = jax.nn.softmax(vals, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            vals = jnp.where(mass_before < top_p, vals, _NEG_INF)
        return vals, ids.astype(jnp.int32)
    ids = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v))
    if top_p >= 1.0:
        return logits, ids
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= nucleus_threshold(probs, top_p)[:, None]
    return jnp.where(keep, logits, _NEG_INF), ids


def nucleus_threshold(probs: jax.Array, top_p: float) -> jax.Array:
    """Smallest probability kept by top-p, per row, without sorting.

    A token with probability ``q`` is in the nucleus iff the mass of the tokens strictly more
    likely than it, ``M(q)``, is below ``top_p``; ``M`` falls as ``q`` grows, so the smallest
    kept ``q`` is found by bisection. Bisecting the int32 bit patterns of non-negative float32
    values (ordered like the values) ends exactly after 32 halvings of ``[0, max p]``.

    Args:
        probs: ``[B, V]`` float32, rows summing to 1.

    Returns:
        ``[B]`` float32 threshold: the nucleus is ``probs >= threshold``.
    """

    def kept(bits: jax.Array) -> jax.Array:
        t = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.sum(jnp.where(probs > t[:, None], probs, 0.0), axis=-1) < top_p

    def halve(_, bounds):
        lo, hi = bounds  # kept(hi) holds; kept(lo) does not (or lo = 0)
        mid = lo + (hi - lo) // 2
        ok = kept(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    hi = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32)
    lo = jnp.zeros_like(hi)
    _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jax.lax.bitcast_convert_type(hi, jnp.float32)


def argmax_first(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first index on ties), ``[B, V] -> [B]`` int32.

    Written as max-then-min-index: on CPU, XLA's argmax reduction over a 151,936-wide row took
    10 ms for a batch of 8 and ``top_k(., 1)`` 1.2-2.4 ms; these two plain reductions ~1 ms.
    """
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(v, dtype=jnp.int32)
    first = jnp.min(jnp.where(logits == top, index, v), axis=-1)
    return jnp.minimum(first, v - 1).astype(jnp.int32)  # stays a token id even for NaN rows


def choose_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig):
    """Draw one token per row. ``logits [B, V]`` float32 -> ``(tokens [B] int32, logp [B])``.

    ``logp`` is the drawn token's log-prob under ``log_softmax(logits / T)`` (module docstring).
    """
    scaled = logits / cfg.logprob_temperature
    if cfg.greedy:
        tokens = argmax_first(logits)
    else:
        vals, ids = filter_logits(scaled, top_k=cfg.top_k, top_p=cfg.top_p)
        pick = categorical(key, vals)
        tokens = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
    picked = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
    return tokens, picked - jax.nn.logsumexp(scaled, axis=-1)


def categorical(key: jax.Array, logits: jax.Array, block: int = 512) -> jax.Array:
    """Draw one index per row from ``softmax(logits)``; ``logits [B, K]`` -> ``[B]`` int32.

    For a large K (a whole vocabulary) the draw is two-level: a block of ``block`` candidates
    by its total probability, then a candidate within the block. The distribution is exactly
    the same (P(block) P(index | block)), but it needs about ``K / block + block`` random
    numbers per row instead of K; generating 151,936 per row per token was the largest cost of
    a CPU decode step (measured: 60 ms of a 70 ms step at batch 8).
    """
    b, k = logits.shape
    if k <= 8 * block:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    pad = (-k) % block
    blocks = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=_NEG_INF).reshape(b, -1, block)
    k_block, k_inner = jax.random.split(key)
    which = jax.random.categorical(k_block, jax.nn.logsumexp(blocks, axis=-1), axis=-1)
    inner = jnp.take_along_axis(blocks, which[:, None, None], axis=1)[:, 0]
    within = jax.random.categorical(k_inner, inner, axis=-1)
    return (which * block + within).astype(jnp.int32)


def _ends_with_stop(tail: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """``tail [B, L]`` (the last L response tokens, newest last; -1 where not generated yet) ->
    ``[B]`` bool: the response ends with one of ``cfg.stop_sequences``."""
    hit = jnp.zeros(tail.shape[0], bool)
    for seq in cfg.stop_sequences:
        want = jnp.asarray(seq, jnp.int32)
        hit = hit | jnp.all(tail[:, tail.shape[1] - len(seq):] == want, axis=-1)
    return hit


# ---- the decode loop ----------------------------------------------------------------------------


def sample(
    model: Qwen3ForCausalLM,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    cfg: SamplingConfig,
    cache_shardings: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Prefill the left-padded prompts, then decode until all rows stop (jittable, pure).

    Args:
        model: the policy.
        prompt_ids: ``[B, P]`` int32, left-padded.
        prompt_mask: ``[B, P]`` int32, 1 on real prompt tokens.
        key: PRNG key (unused when greedy).
        cfg: sampling knobs (static).
        cache_shardings: optional shardings of the ``KVCache`` (placement of the cache).

    Returns:
        ``tokens [B, N] int32, logprobs [B, N] float32, lengths [B] int32, stopped [B] bool``
        with ``N = cfg.max_new_tokens``.
    """
    b, p = prompt_ids.shape
    n = cfg.max_new_tokens
    # Prefill into a cache of exactly P slots, then grow it by N empty slots: the prompt's
    # attention then spans [P, P] instead of [P, P + N] (for 4K prompts and 16K responses, 5x
    # less prefill attention memory and work). Empty slots are masked, so nothing changes.
    logits, cache = model.prefill(prompt_ids, prompt_mask, model.init_cache(b, p),
                                  chunk_size=cfg.prefill_chunk)
    cache = cache.extend(n)
    if cache_shardings is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings)
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
    tail_len = max([len(s) for s in cfg.stop_sequences], default=1)

    def record(c: dict, logits: jax.Array) -> dict:
        """Draw token ``c["i"]`` of every live row from ``logits [B, V]`` and write it."""
        key, sub = jax.random.split(c["key"])
        tok, logp = choose_tokens(logits, sub, cfg)
        live = ~c["done"]
        tok = jnp.where(live, tok, cfg.pad_token_id)
        logp = jnp.where(live, logp, 0.0)
        tail = jnp.concatenate([c["tail"][:, 1:], tok[:, None]], axis=1)
        ended = live & (jnp.any(tok[:, None] == eos[None, :], axis=-1) | _ends_with_stop(tail, cfg))
        return dict(
            c,
            i=c["i"] + 1,
            tok=tok,
            done=c["done"] | ended,
            stopped=c["stopped"] | ended,
            tokens=jax.lax.dynamic_update_slice(c["tokens"], tok[:, None], (0, c["i"])),
            logprobs=jax.lax.dynamic_update_slice(c["logprobs"], logp[:, None], (0, c["i"])),
            lengths=c["lengths"] + live.astype(jnp.int32),
            tail=tail,
            key=key,
        )

    start = dict(
        i=jnp.zeros((), jnp.int32),
        cache=cache,
        tok=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        stopped=jnp.zeros((b,), bool),
        tokens=jnp.full((b, n), cfg.pad_token_id, jnp.int32),
        logprobs=jnp.zeros((b, n), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        tail=jnp.full((b, tail_len), -1, jnp.int32),
        key=key,
    )
    # The loop carries the last token, not the [B, V] logits; the first token comes from the
    # prefill, and the last one drawn is never fed back.
    carry = record(start, logits)

    def cond(c):
        return (c["i"] < n) & ~jnp.all(c["done"])

    def body(c):
        # A stopped row feeds mask 0: its padding never becomes a visible cache slot.
        logits, cache = model.decode(
            c["tok"][:, None], (~c["done"])[:, None].astype(jnp.int32), c["cache"],
            last_only=True,
        )
        return record(dict(c, cache=cache), logits)

    out = jax.lax.while_loop(cond, body, carry)
    return out["tokens"], out["logprobs"], out["lengths"], out["stopped"]


def prompt_buckets(max_prompt_len: int, smallest: int = 64) -> tuple[int, ...]:
    """Power-of-two padded prompt lengths from ``smallest`` up to ``max_prompt_len``."""
    out, b = [], min(smallest, max_prompt_len)
    while b < max_prompt_len:
        out.append(b)
        b *= 2
    return (*out, max_prompt_len)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """``(ids [B, length] int32, mask [B, length] int32)`` with each prompt at the right end."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than {length}")
        if len(p):
            ids[i, length - len(p):] = p
            mask[i, length - len(p):] = 1
    return ids, mask


def stop_sequences_from_strings(tokenizer, strings: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences of ``strings`` under ``tokenizer`` (no special tokens added)."""
    out = []
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if not ids:
            raise ValueError(f"stop string {s!r} encodes to no tokens")
        out.append(tuple(ids))
    return tuple(out)


class JaxSampler:
    """The in-process JAX rollout engine (implements ``Sampler``).

    Args:
        model: the policy (its structure; parameters come from ``load_params`` or the model).
        config: sampling knobs.
        mesh: where parameters, batch and KV cache live.
        batch_size: rows per decode loop; a ``generate`` call with more prompts runs several
            loops one after another. Must be divisible by the mesh's data x fsdp size.
        max_prompt_len: longest prompt accepted; prompts are padded to a bucket of
            ``prompt_buckets(max_prompt_len, min_prompt_bucket)``.
    """

    def __init__(
        self,
        model: Qwen3ForCausalLM,
        config: SamplingConfig,
        *,
        mesh: Mesh,
        batch_size: int,
        max_prompt_len: int,
        min_prompt_bucket: int = 64,
    ):
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % ways:
            raise ValueError(
                f"sampler batch_size={batch_size} must be divisible by the mesh's data x fsdp "
                f"= {ways}"
            )
        self.config = config
        self.mesh = mesh
        self.batch_size = batch_size
        self.buckets = prompt_buckets(max_prompt_len, min_prompt_bucket)
        # Decoding reads the whole LM head every token. With tied embeddings the head is the
        # [vocab, hidden] table, which XLA's CPU matmul reads about 2x slower than a
        # [hidden, vocab] kernel (measured: 5.3 vs 2.7 ms at hidden 64, 17.9 vs 9.5 ms at 256,
        # vocab 151,936, batch 8). So the sampler decodes with an untied copy of the model whose
        # head kernel is the transposed embedding, rebuilt by `load_params` once per rollout.
        self._untie = bool(model.cfg.tie_word_embeddings)
        dec_cfg = dataclasses.replace(model.cfg, tie_word_embeddings=False)
        decoder = nnx.eval_shape(lambda: Qwen3ForCausalLM(dec_cfg, rngs=nnx.Rngs(0)))
        graphdef, dec_params, rest = nnx.split(decoder, nnx.Param, ...)
        self._param_shardings = nnx.to_pure_dict(param_shardings(dec_params, mesh))
        self._abstract_params = nnx.to_pure_dict(dec_params)
        self._prepare = jax.jit(self._with_head, out_shardings=self._param_shardings)
        batch = self._batch = batch_sharding(mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract_cache = jax.eval_shape(lambda: decoder.init_cache(batch_size, 8))
        cache_sh = tree_shardings(abstract_cache, abstract_cache.logical_axes(), mesh)

        def run(params, ids, mask, key):
            lm = nnx.merge(graphdef, params, rest)
            return sample(lm, ids, mask, key, config, cache_sh)

        self._run = jax.jit(
            run,
            in_shardings=(self._param_shardings, batch, batch, replicated),
            out_shardings=(batch, batch, batch, batch),
        )
        self._params = None
        policy_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        if all(isinstance(x, jax.Array) for x in jax.tree.leaves(policy_params)):
            self.load_params(policy_params)

    def _with_head(self, params: dict) -> dict:
        if not self._untie:
            return params
        head = jnp.swapaxes(params["model"]["embed_tokens"]["embedding"], 0, 1)
        return {**params, "lm_head": {"kernel": head}}

    def load_params(self, params: Any) -> None:
        """Sample with ``params`` (a pure dict as ``nnx.to_pure_dict``, already on the mesh)."""
        with jax.set_mesh(self.mesh):
            self._params = self._prepare(params)

    def lower(self, prompt_len: int):
        """``jax.stages.Lowered`` of one decode loop on abstract inputs (for dry runs)."""
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        a_params = jax.tree.map(sds, self._abstract_params, self._param_shardings)
        batch = batch_sharding(self.mesh)
        a_ids = jax.ShapeDtypeStruct((self.batch_size, prompt_len), jnp.int32, sharding=batch)
        a_key = jax.eval_shape(lambda: jax.random.key(0))
        with jax.set_mesh(self.mesh):
            return self._run.lower(a_params, a_ids, a_ids, a_key)

    def generate(self, prompts: Sequence[Sequence[int]], rng: jax.Array) -> SampleOutput:
        """Sample one response per prompt (see ``SampleOutput``).

        All prompts share one padded length (the bucket of the longest), so the caller can
        concatenate prompts and responses of the whole call. Chunk ``c`` of ``batch_size``
        rows uses ``fold_in(rng, c)``.
        """
        if not len(prompts):
            raise ValueError("generate: no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: empty prompt (the first token needs a context)")
        longest = max(len(p) for p in prompts)
        if longest > self.buckets[-1]:
            raise ValueError(f"a prompt has {longest} tokens; max_prompt_len is {self.buckets[-1]}")
        n_rows = len(prompts)
        procs = jax.process_count()
        if procs > 1:  # this process's rows (module docstring): agree on the shapes first
            longest, most, fewest = (int(v) for v in global_max([longest, n_rows, -n_rows]))
            if most != -fewest:
                raise ValueError(f"generate: the processes hold between {-fewest} and {most} "
                                 "prompts; multi-host sampling needs the same number on each")
            if self.batch_size % procs:
                raise ValueError(f"sampler batch_size={self.batch_size} is not divisible by "
                                 f"the {procs} processes")
        per_loop = self.batch_size // procs  # this process's rows of each decode loop
        p_len = next(b for b in self.buckets if b >= longest)
        cfg = self.config
        outs = []
        with jax.set_mesh(self.mesh):
            for c, start in enumerate(range(0, n_rows, per_loop)):
                rows = list(prompts[start : start + per_loop])
                real = len(rows)
                rows += [rows[-1]] * (per_loop - real)  # filler rows, dropped below
                ids, mask = left_pad(rows, p_len, cfg.pad_token_id)
                if procs > 1:
                    ids, mask = rows_to_global(self._batch, ids), rows_to_global(self._batch, mask)
                if self._params is None:
                    raise RuntimeError("JaxSampler: no parameters; call load_params first")
                res = self._run(self._params, ids, mask, jax.random.fold_in(rng, c))
                # device_get waits for each loop before the next (fake CPU devices deadlock on
                # piles of independent collectives) and brings the rows to the host.
                fetch = local_rows if procs > 1 else _host
                outs.append([np.asarray(fetch(x))[:real] for x in res])
        tokens, logprobs, lengths, stopped = (np.concatenate(x) for x in zip(*outs))
        return SampleOutput(tokens, logprobs, lengths, stopped, p_len)


SamplerFactory = Callable[..., Sampler]
"""Rollout engines by name: ``factory(model, config, *, mesh, batch_size, max_prompt_len,
min_prompt_bucket) -> Sampler``."""
JaxSampler.multihost = True  # each process passes its own rows (module docstring)
SAMPLERS.register("jax")(JaxSampler)


def _host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-host) array on this host."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

