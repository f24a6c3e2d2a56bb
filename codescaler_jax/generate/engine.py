"""Continuous batching: a fixed number of decode slots, each refilled as soon as its row ends.

The static sampler (``JaxSampler``) decodes ``batch_size`` rows until the longest one stops, so
with skewed response lengths most slot-steps are spent on rows that have already finished.
``ContinuousSampler`` keeps ``batch_size`` *slots* instead. When a row ends (EOS, a stop
sequence, or ``max_new_tokens``), the host hands its results back and writes the next waiting
prompt into that slot, ``chunk`` tokens at a time, into the slot's own region of the KV cache
(``[layers, slots, S, kv_heads, head_dim]``); the decode batch is full again on the next step.

Two compiled programs do the device work, whatever requests come and go (``traces`` counts
their traces, so a test can check there is no recompilation):

- ``prefill``: one prompt chunk ``[chunk]`` of one slot (a traced slot index), written at the
  slot's next cache slots; on the prompt's last chunk it also draws the row's first token.
- ``decode``: a ``lax.while_loop`` of one-token steps over all slots, each row writing its own
  next cache slot (``KVCache.index`` per row), until a slot frees while prompts are waiting
  (or every slot is done). Exiting only then keeps host round trips to one per finished row
  (its done flags); a finished row is copied out on device and fetched with all the others
  at the end.

Same tokens as the static sampler: row ``r`` draws with the key chain ``fold_in(rng, r)``,
split once per token, one row at a time (greedy: no key at all). That is exactly what
``JaxSampler`` with ``batch_size=1`` does for row ``r`` (chunk ``c`` = row ``c``), so for the
same per-row RNG both engines give the same tokens, up to float rounding between batch shapes.

Cache layout per slot: the prompt's first chunk is left-padded (the padding slots stay
invalid), so the last chunk ends on the prompt's last token; generated tokens follow. Slot
order does not matter to attention (positions come from ``next_pos``), only validity.
The cache is sharded like the static sampler's: slots over ``data``/``fsdp``, KV heads over
``tensor``. The prefill reads one slot's row with a one-hot select (local, then one all-reduce
of that row) and writes back only its chunk's positions, so no device ever holds more than its
shard of the cache plus one row.

``last_stats`` after each ``generate``: decode steps, prefill chunks, and the decode slot
utilisation (live slot-steps / (decode steps x slots)).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codescaler_jax.generate.sampler import (
    SAMPLERS,
    JaxSampler,
    SampleOutput,
    SamplingConfig,
    _ends_with_stop,
    _host,
    choose_tokens,
)
from codescaler_jax.models.qwen3 import KVCache, Qwen3ForCausalLM
from codescaler_jax.models.sharding import batch_sharding, tree_shardings


def _draw(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig):
    """One token per row with the row's own key: ``logits [B, V]``, ``keys [B]`` ->
    ``(tokens [B], logp [B])``, each row as ``choose_tokens`` on a batch of one."""
    if cfg.greedy:  # row-independent already, and no randomness
        return choose_tokens(logits, keys[0], cfg)
    tok, logp = jax.vmap(lambda lg, k: choose_tokens(lg[None], k, cfg))(logits, keys)
    return tok[:, 0], logp[:, 0]


def _record(s: dict, logits: jax.Array, active: jax.Array, cfg: SamplingConfig) -> dict:
    """Draw the next token of every ``active`` row (``[B]`` bool) from ``logits [B, V]`` and
    write it at the row's own position; rows end at EOS, a stop sequence or the budget."""
    n = s["tokens"].shape[1]
    split = jax.vmap(jax.random.split)(s["keys"])
    tok, logp = _draw(logits, split[:, 1], cfg)
    tok = jnp.where(active, tok, cfg.pad_token_id)
    logp = jnp.where(active, logp, 0.0)
    tail = jnp.where(active[:, None],
                     jnp.concatenate([s["tail"][:, 1:], tok[:, None]], axis=1), s["tail"])
    eos = jnp.asarray(cfg.eos_token_ids or (-1,), jnp.int32)
    ended = active & (jnp.any(tok[:, None] == eos[None, :], axis=-1) | _ends_with_stop(tail, cfg))
    at = active[:, None] & (jnp.arange(n)[None, :] == s["count"][:, None])
    count = s["count"] + active.astype(jnp.int32)
    return dict(
        s,
        tok=jnp.where(active, tok, s["tok"]),
        keys=jnp.where(active, split[:, 0], s["keys"]),
        tail=tail,
        tokens=jnp.where(at, tok[:, None], s["tokens"]),
        logprobs=jnp.where(at, logp[:, None], s["logprobs"]),
        count=count,
        stopped=s["stopped"] | ended,
        done=s["done"] | ended | (active & (count >= n)),
    )


# Rows are read and written by a one-hot select over the slot axis, not a dynamic slice: the
# slot axis is sharded over data/fsdp, and XLA's partitioner gathers the whole operand onto
# every device for a dynamic slice at a traced index (seen in the compiled prefill: the full
# KV cache all-gathered). A select stays local; reading a row costs one all-reduce of it.


def _hot(n: int, slot: jax.Array, ndim: int, axis: int = 0) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = n
    return (jnp.arange(n) == slot).reshape(shape)


def _row(x: jax.Array, slot: jax.Array, axis: int = 0) -> jax.Array:
    """Row ``slot`` of ``x`` along ``axis``, kept as a size-1 axis."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_row(jax.random.key_data(x), slot, axis),
                                        impl=jax.random.key_impl(x))
    hot = _hot(x.shape[axis], slot, x.ndim, axis)
    return jnp.sum(jnp.where(hot, x, jnp.zeros((), x.dtype)), axis=axis,
                   keepdims=True).astype(x.dtype)


def _put(x: jax.Array, row: jax.Array, slot: jax.Array, axis: int = 0) -> jax.Array:
    """``x`` with row ``slot`` (along ``axis``) replaced by ``row`` (a size-1 axis there)."""
    return jnp.where(_hot(x.shape[axis], slot, x.ndim, axis), row.astype(x.dtype), x)


def _rows(tree: Any, slot: jax.Array) -> Any:
    """Row ``slot`` of every per-slot array (the leading axis), kept as a batch of one."""
    return jax.tree.map(lambda x: _row(x, slot), tree)


def _put_rows(tree: Any, rows: Any, slot: jax.Array) -> Any:
    return jax.tree.map(lambda x, r: _put(x, r, slot), tree, rows)


class ContinuousSampler(JaxSampler):
    """The continuous-batching rollout engine (implements ``Sampler``; registered ``continuous``).

    Args: as ``JaxSampler``, with ``batch_size`` the number of decode slots, plus
        chunk: prompt tokens written per prefill step (default ``config.prefill_chunk``,
            else ``min(max_prompt_len, 512)``).
        min_free: the decode loop returns to the host (to refill) once this many slots are
            free while prompts wait; 1 keeps the slots fullest, more means fewer host round
            trips (each one a device sync).
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
        chunk: int | None = None,
        min_free: int = 1,
    ):
        super().__init__(model, config, mesh=mesh, batch_size=batch_size,
                         max_prompt_len=max_prompt_len, min_prompt_bucket=min_prompt_bucket)
        self.chunk = int(chunk or config.prefill_chunk or min(max_prompt_len, 512))
        if not 1 <= min_free <= batch_size:
            raise ValueError(f"min_free={min_free} must be in [1, batch_size={batch_size}]")
        self.min_free = min_free
        n, b, c = config.max_new_tokens, batch_size, self.chunk
        # A slot holds its prompt's chunks (the first left-padded) then up to N - 1 fed-back
        # tokens (the last token drawn is never fed back).
        self.cache_len = -(-max_prompt_len // c) * c + n
        self.traces: collections.Counter[str] = collections.Counter()
        self.last_stats: dict[str, float] = {}

        dec_cfg = dataclasses.replace(model.cfg, tie_word_embeddings=False)
        decoder = nnx.eval_shape(lambda: Qwen3ForCausalLM(dec_cfg, rngs=nnx.Rngs(0)))
        graphdef, _, rest = nnx.split(decoder, nnx.Param, ...)
        tail_len = max([len(s) for s in config.stop_sequences], default=1)

        def init() -> dict:
            self.traces["init"] += 1
            cache = decoder.init_cache(b, self.cache_len)
            cache = dataclasses.replace(cache, index=jnp.zeros((b,), jnp.int32))
            return dict(
                cache=cache,
                tok=jnp.zeros((b,), jnp.int32),
                done=jnp.ones((b,), bool),
                stopped=jnp.zeros((b,), bool),
                count=jnp.zeros((b,), jnp.int32),
                tail=jnp.full((b, tail_len), -1, jnp.int32),
                keys=jax.random.split(jax.random.key(0), b),
                tokens=jnp.full((b, n), config.pad_token_id, jnp.int32),
                logprobs=jnp.zeros((b, n), jnp.float32),
                steps=jnp.zeros((), jnp.int32),
                live_steps=jnp.zeros((), jnp.int32),
            )

        abstract = jax.eval_shape(init)
        self.traces.clear()
        batch = batch_sharding(mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        state_sh = {k: (replicated if not v.shape else batch) for k, v in abstract.items()
                    if k != "cache"}
        state_sh["cache"] = tree_shardings(abstract["cache"], abstract["cache"].logical_axes(),
                                           mesh)

        def prefill(params, s, slot, ids, mask, first, last, rng, request):
            """Write chunk ``ids [C]`` (``mask [C]``) of ``request`` into ``slot``; draw on the
            last chunk. The row's key ``fold_in(rng, request)`` is made here (no host op)."""
            self.traces["prefill"] += 1
            key = jax.random.fold_in(rng, request)
            lm = nnx.merge(graphdef, params, rest)
            per_slot = {k: v for k, v in s.items() if k not in ("cache", "steps", "live_steps")}
            row = _rows(per_slot, slot)
            cache = s["cache"]
            k_row, v_row = _row(cache.k, slot, axis=1), _row(cache.v, slot, axis=1)
            c_row = _rows(dict(mask=cache.mask, next_pos=cache.next_pos, index=cache.index),
                          slot)
            # The first chunk starts a new request: forget the slot's old cache and row.
            c_row = jax.tree.map(lambda x: jnp.where(first, jnp.zeros_like(x), x), c_row)
            fresh = dict(
                tok=jnp.zeros_like(row["tok"]), done=jnp.ones_like(row["done"]),
                stopped=jnp.zeros_like(row["stopped"]), count=jnp.zeros_like(row["count"]),
                tail=jnp.full_like(row["tail"], -1), keys=key[None],
                tokens=jnp.full_like(row["tokens"], config.pad_token_id),
                logprobs=jnp.zeros_like(row["logprobs"]),
            )
            row = jax.tree.map(lambda new, old: jnp.where(first, new, old), fresh, row)
            start = c_row["index"][0]
            row_cache = KVCache(k=k_row, v=v_row, mask=c_row["mask"], next_pos=c_row["next_pos"],
                                index=start)
            hidden, row_cache = lm.model(ids[None], mask[None], row_cache)
            # Write back only the chunk's C cache positions (a slice along the unsharded
            # sequence axis, then the slot selected in it).
            def put(big: jax.Array, new: jax.Array) -> jax.Array:
                region = jax.lax.dynamic_slice_in_dim(big, start, c, axis=2)
                chunk = jax.lax.dynamic_slice_in_dim(new, start, c, axis=2)
                return jax.lax.dynamic_update_slice_in_dim(
                    big, _put(region, chunk, slot, axis=1), start, axis=2)

            cache = KVCache(
                k=put(cache.k, row_cache.k), v=put(cache.v, row_cache.v),
                mask=_put(cache.mask, row_cache.mask, slot),
                next_pos=_put(cache.next_pos, row_cache.next_pos, slot),
                index=_put(cache.index, row_cache.index[None], slot),
            )
            logits = lm.logits(hidden[:, -1])  # [1, V]: after the prompt's last token
            row = dict(row, done=jnp.where(last, False, row["done"]))
            row = _record(row, logits, last[None], config)
            return dict(s, **_put_rows(per_slot, row, slot), cache=cache)

        def decode(params, s, want_free):
            """One-token steps over all slots until ``want_free`` slots are done."""
            self.traces["decode"] += 1
            lm = nnx.merge(graphdef, params, rest)

            def cond(s):
                free = jnp.sum(s["done"].astype(jnp.int32))
                return (free < want_free) & ~jnp.all(s["done"])

            def body(s):
                live = ~s["done"]
                old = s["cache"].index
                logits, cache = lm.decode(s["tok"][:, None], live[:, None].astype(jnp.int32),
                                          s["cache"], last_only=True)
                # A finished row keeps its slot pointer: it writes nothing visible.
                cache = dataclasses.replace(cache, index=jnp.where(live, cache.index, old))
                cache = jax.lax.with_sharding_constraint(cache, state_sh["cache"])
                s = _record(dict(s, cache=cache), logits, live, config)
                return dict(s, steps=s["steps"] + 1,
                            live_steps=s["live_steps"] + jnp.sum(live.astype(jnp.int32)))

            return jax.lax.while_loop(cond, body, s)

        def fetch(s, slot):
            self.traces["fetch"] += 1
            return _rows({k: s[k] for k in ("tokens", "logprobs", "count", "stopped")}, slot)

        scalar = replicated
        self._init = jax.jit(init, out_shardings=state_sh)
        self._prefill = jax.jit(
            prefill, donate_argnums=(1,),
            in_shardings=(self._param_shardings, state_sh, scalar, scalar, scalar, scalar,
                          scalar, scalar, scalar),
            out_shardings=state_sh)
        self._decode = jax.jit(decode, donate_argnums=(1,),
                               in_shardings=(self._param_shardings, state_sh, scalar),
                               out_shardings=state_sh)
        self._fetch = jax.jit(fetch, in_shardings=(state_sh, scalar))

    def _chunks(self, prompt: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The prompt as ``[chunk]`` (ids, mask) pieces, the first left-padded."""
        c, p = self.chunk, len(prompt)
        n = -(-p // c)
        ids = np.full(n * c, self.config.pad_token_id, np.int32)
        mask = np.zeros(n * c, np.int32)
        ids[n * c - p:] = prompt
        mask[n * c - p:] = 1
        return [(ids[i * c:(i + 1) * c], mask[i * c:(i + 1) * c]) for i in range(n)]

    def generate(self, prompts: Sequence[Sequence[int]], rng: jax.Array) -> SampleOutput:
        """Sample one response per prompt; row ``r`` uses the key ``fold_in(rng, r)``."""
        if not len(prompts):
            raise ValueError("generate: no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: empty prompt (the first token needs a context)")
        longest = max(len(p) for p in prompts)
        if longest > self.buckets[-1]:
            raise ValueError(f"a prompt has {longest} tokens; max_prompt_len is {self.buckets[-1]}")
        if self._params is None:
            raise RuntimeError("ContinuousSampler: no parameters; call load_params first")
        cfg, slots = self.config, self.batch_size
        n_rows, n = len(prompts), cfg.max_new_tokens
        tokens = np.full((n_rows, n), cfg.pad_token_id, np.int32)
        logprobs = np.zeros((n_rows, n), np.float32)
        lengths = np.zeros(n_rows, np.int32)
        stopped = np.zeros(n_rows, bool)
        waiting = collections.deque(range(n_rows))
        owner = [-1] * slots  # the request each slot is decoding
        finished = []  # (request, its row still on device): fetched in one transfer at the end
        prefill_chunks = 0
        with jax.set_mesh(self.mesh):
            state = self._init()
            while True:
                for b in range(slots):
                    if owner[b] >= 0 or not waiting:
                        continue
                    r = waiting.popleft()
                    pieces = self._chunks(prompts[r])
                    for i, (ids, mask) in enumerate(pieces):
                        state = self._prefill(self._params, state, np.int32(b), ids, mask,
                                              np.bool_(i == 0), np.bool_(i == len(pieces) - 1),
                                              rng, np.int32(r))
                    prefill_chunks += len(pieces)
                    owner[b] = r
                if all(o < 0 for o in owner):
                    break
                want = min(self.min_free, len(waiting)) if waiting else slots
                state = self._decode(self._params, state, np.int32(want))
                done = _host(state["done"])
                for b in np.flatnonzero(done):
                    if owner[b] < 0:
                        continue
                    # Copied out on device before the slot is refilled; no wait here.
                    finished.append((owner[b], self._fetch(state, np.int32(b))))
                    owner[b] = -1
            steps = int(_host(state["steps"]))
            live = int(_host(state["live_steps"]))
            for r, row in zip([r for r, _ in finished],
                              _host_tree([row for _, row in finished]), strict=True):
                tokens[r], logprobs[r] = row["tokens"][0], row["logprobs"][0]
                lengths[r], stopped[r] = row["count"][0], row["stopped"][0]
        self.last_stats = dict(
            decode_steps=steps, prefill_chunks=prefill_chunks, slots=slots,
            slot_utilisation=live / (steps * slots) if steps else 1.0,
        )
        p_len = next(b for b in self.buckets if b >= longest)
        return SampleOutput(tokens, logprobs, lengths, stopped, p_len)


def _host_tree(tree: Any) -> Any:
    """``_host`` of every array, in one transfer when they are all on this host."""
    leaves = jax.tree.leaves(tree)
    if all(x.is_fully_addressable for x in leaves):
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(_host, tree)


SAMPLERS.register("continuous")(ContinuousSampler)
