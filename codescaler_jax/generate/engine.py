"""Continuous batching: a fixed number of decode slots, each refilled as soon as its row ends.

The static sampler (``JaxSampler``) decodes ``batch_size`` rows until the longest one stops, so
with skewed response lengths most slot-steps are spent on rows that have already finished.
``ContinuousSampler`` keeps ``batch_size`` *slots* instead. When a row ends (EOS, a stop
sequence, or ``max_new_tokens``), the next waiting prompt is written into that slot, ``chunk``
tokens at a time, into the slot's own region of the KV cache (``[layers, slots, S, kv_heads,
head_dim]``); the decode batch is full again on the next step.

The whole ``generate`` call is one compiled program (``run``), with no host round trip per
refill: the prompts go to the device as a queue (left-padded to whole chunks; ``slots x 2^k``
rows, so one program per queue bucket, ``queue_bucket``), and a ``lax.while_loop`` alternates

- refill: the next ``refill_batch`` waiting requests (or fewer) take the first free slots
  (their finished rows go to the output first) and are prefilled together (``refill``), one
  ``[refill_batch, chunk]`` prefill step per chunk at a traced chunk index, from the group's
  first chunk that is not all padding; the last chunk draws each row's first token; repeated
  until every free slot is refilled (once ``min_free`` are free). ``refill_batch = 1`` is one
  slot at a time, its all-padding leading chunks skipped;
- decode: an inner loop of one-token steps over all slots (``decode``, each row writing its own
  next cache slot, ``KVCache.index`` per row) until a slot frees while prompts wait, or every
  row is done.

``traces`` counts the traces of ``run``, ``prefill`` and ``decode`` (one each per bucket), so a
test can check there is no recompilation as requests come and go. Inner loops, not a
``lax.cond`` per step: XLA copied the whole KV cache into and out of the branches of a
conditional every step (seen in the compiled program), while a loop carry is updated in place.

Same tokens as the static sampler: row ``r`` draws with the key chain ``fold_in(rng, r)``,
split once per token, one row at a time (greedy: no key at all). That is exactly what
``JaxSampler`` with ``batch_size=1`` does for row ``r`` (chunk ``c`` = row ``c``), so for the
same per-row RNG both engines give the same tokens, up to float rounding between batch shapes.

Cache layout per slot: the group's first chunk is written from slot 0 (a row's padding, and
the all-padding chunks of a shorter prompt in the group, stay invalid), so the last chunk ends
on the prompt's last token; generated tokens follow. A refill writes and attends only the
prompt region (the first ``n_chunks x chunk`` slots). Slot order does not matter to attention
(positions come from ``next_pos``), only validity. The cache is sharded like the static
sampler's: slots over ``data``/``fsdp``, KV heads over ``tensor``. A refill builds its rows'
prompt caches in a fresh ``[layers, refill_batch, queue_len, ...]`` buffer and then writes
each row into its slot: with sharded slots by a one-hot select over the slot axis (local to
each device), so no device ever holds more than its shard of the cache plus the group's
prompt rows; with unsharded slots (one data x fsdp way) by a scatter.

Multi-host (``jax.distributed``): each process passes ``generate`` its own prompts, the same
number on every process; the queue is every process's prompts in process order (gathered,
then replicated), decoded through the global slots, and each process gets back its own rows.
Request ``r`` of that queue draws with ``fold_in(rng, r)``, so the tokens equal one process
sampling all the rows in that order, on any number of processes.

``last_stats`` after each ``generate``: decode steps, prefill steps (``prefill_chunks``), the
decode slot utilisation (live slot-steps / (decode steps x slots)) and the queue bucket.
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

from codescaler_jax.distributed import gather_rows, global_max
from codescaler_jax.generate.sampler import (
    SAMPLERS,
    JaxSampler,
    SampleOutput,
    SamplingConfig,
    _ends_with_stop,
    choose_tokens,
    left_pad,
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
    if cfg.greedy:  # no randomness: the keys stay as they are
        keys = s["keys"]
        tok, logp = _draw(logits, keys, cfg)
    else:
        split = jax.vmap(jax.random.split)(s["keys"])
        keys = jnp.where(active, split[:, 0], s["keys"])
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
        keys=keys,
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


def _row(x: jax.Array, slot: jax.Array, axis: int = 0, local: bool = False) -> jax.Array:
    """Row ``slot`` of ``x`` along ``axis``, kept as a size-1 axis. ``local``: the axis is
    not sharded, so a dynamic slice reads just the row (else a one-hot select, see above)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_row(jax.random.key_data(x), slot, axis, local),
                                        impl=jax.random.key_impl(x))
    if local:
        return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis)
    hot = _hot(x.shape[axis], slot, x.ndim, axis)
    return jnp.sum(jnp.where(hot, x, jnp.zeros((), x.dtype)), axis=axis,
                   keepdims=True).astype(x.dtype)


def _put(x: jax.Array, row: jax.Array, slot: jax.Array, axis: int = 0,
         local: bool = False) -> jax.Array:
    """``x`` with row ``slot`` (along ``axis``) replaced by ``row`` (a size-1 axis there)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(x), jax.random.key_data(row), slot, axis, local)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if local:
        return jax.lax.dynamic_update_slice_in_dim(x, row.astype(x.dtype), slot, axis)
    return jnp.where(_hot(x.shape[axis], slot, x.ndim, axis), row.astype(x.dtype), x)


def _rows(tree: Any, slot: jax.Array, local: bool = False) -> Any:
    """Row ``slot`` of every per-slot array (the leading axis), kept as a batch of one."""
    return jax.tree.map(lambda x: _row(x, slot, local=local), tree)


def _put_rows(tree: Any, rows: Any, slot: jax.Array, local: bool = False) -> Any:
    return jax.tree.map(lambda x, r: _put(x, r, slot, local=local), tree, rows)


def _gather(x: jax.Array, slots: jax.Array, axis: int = 0, local: bool = False) -> jax.Array:
    """Rows ``slots [R]`` of ``x`` along ``axis`` (``R`` in place of that axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_gather(jax.random.key_data(x), slots, axis, local),
                                        impl=jax.random.key_impl(x))
    if local:
        return jnp.take(x, slots, axis=axis)
    return jnp.concatenate([_row(x, slots[i], axis) for i in range(slots.shape[0])], axis=axis)


def _scatter(x: jax.Array, rows: jax.Array, slots: jax.Array, axis: int = 0,
             local: bool = False) -> jax.Array:
    """``x`` with rows ``slots [R]`` (along ``axis``) replaced by ``rows``; a slot index
    ``>= x.shape[axis]`` writes nothing (the slots written must be distinct)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _scatter(jax.random.key_data(x), jax.random.key_data(rows), slots, axis, local)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    rows = rows.astype(x.dtype)
    if local:
        return x.at[(slice(None),) * axis + (slots,)].set(rows, mode="drop")
    for i in range(slots.shape[0]):
        x = _put(x, jax.lax.slice_in_dim(rows, i, i + 1, axis=axis), slots[i], axis)
    return x


def queue_bucket(n_rows: int, slots: int) -> int:
    """Queue capacity of a ``generate`` call of ``n_rows`` prompts: ``slots x 2^k``, the
    smallest that holds them (one compiled program per bucket)."""
    q = slots
    while q < n_rows:
        q *= 2
    return q


class ContinuousSampler(JaxSampler):
    """The continuous-batching rollout engine (implements ``Sampler``; registered ``continuous``).

    Args: as ``JaxSampler``, with ``batch_size`` the number of decode slots, plus
        chunk: prompt tokens written per prefill step (default ``config.prefill_chunk``,
            else ``min(max_prompt_len, 512)``).
        min_free: refilling starts once this many slots are free (or fewer, when fewer
            prompts wait) and then fills every free slot before decoding resumes; 1 keeps
            the slots fullest.
        refill_batch: prompts prefilled together, ``[refill_batch, chunk]`` tokens per
            prefill step (1: one slot at a time). With ``min_free = refill_batch`` the slots
            refill in groups: fewer, fuller prefill steps for a little slot idle time.
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
        refill_batch: int = 1,
    ):
        super().__init__(model, config, mesh=mesh, batch_size=batch_size,
                         max_prompt_len=max_prompt_len, min_prompt_bucket=min_prompt_bucket)
        self.chunk = int(chunk or config.prefill_chunk or min(max_prompt_len, 512))
        if not 1 <= min_free <= batch_size:
            raise ValueError(f"min_free={min_free} must be in [1, batch_size={batch_size}]")
        self.min_free = min_free
        if not 1 <= refill_batch <= batch_size:
            raise ValueError(f"refill_batch={refill_batch} must be in [1, batch_size={batch_size}]")
        self.refill_batch = r_batch = refill_batch
        n, b, c = config.max_new_tokens, batch_size, self.chunk
        # Every prompt is queued left-padded to `n_chunks` whole chunks; its all-padding
        # leading chunks are skipped. A slot holds the prompt's chunks (the first one
        # left-padded) then up to N - 1 fed-back tokens (the last token drawn is never fed
        # back).
        self.n_chunks = -(-max_prompt_len // c)
        self.queue_len = self.n_chunks * c
        self.cache_len = self.queue_len + n
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
                owner=jnp.full((b,), -1, jnp.int32),  # the request in each slot (-1: none)
            )

        abstract = jax.eval_shape(init)
        self.traces.clear()
        batch = batch_sharding(mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        state_sh = {k: (replicated if not v.shape else batch) for k, v in abstract.items()
                    if k != "cache"}
        state_sh["cache"] = tree_shardings(abstract["cache"], abstract["cache"].logical_axes(),
                                           mesh)
        self._state_sh = state_sh
        per_slot_keys = [k for k in abstract if k not in ("cache", "owner")]
        out_keys = ("tokens", "logprobs", "count", "stopped")

        ql = self.queue_len
        local = mesh.shape["data"] * mesh.shape["fsdp"] == 1  # the slot axis is not sharded

        def refill(lm, s, slots, active, reqs, j0, q_ids, q_mask, rng):
            """Start requests ``reqs [R]`` in ``slots [R]`` (distinct; rows where ``active`` is
            False write nothing) and prefill their prompts together, chunk ``j0`` to the last,
            ``C`` tokens per row per step; the last chunk draws each row's first token. A row
            whose prompt has fewer chunks than ``n_chunks - j0`` reads all-padding chunks first
            (invalid cache slots). Only the prompt region (the first ``queue_len`` cache slots)
            is written and attended: a prompt never sees the previous row's tokens."""
            cache = s["cache"]
            n_l, _, _, n_kv, d = cache.k.shape
            rc = KVCache(k=jnp.zeros((n_l, r_batch, ql, n_kv, d), cache.k.dtype),
                         v=jnp.zeros((n_l, r_batch, ql, n_kv, d), cache.v.dtype),
                         mask=jnp.zeros((r_batch, ql), cache.mask.dtype),
                         next_pos=jnp.zeros((r_batch,), cache.next_pos.dtype),
                         index=jnp.zeros((), jnp.int32))
            q_ids, q_mask = q_ids[reqs], q_mask[reqs]

            def chunk_step(carry):
                self.traces["prefill"] += 1
                j, rc, _ = carry
                ids = jax.lax.dynamic_slice_in_dim(q_ids, j * c_len, c_len, axis=1)
                mask = jax.lax.dynamic_slice_in_dim(q_mask, j * c_len, c_len, axis=1)
                mask = jnp.where(active[:, None], mask, jnp.zeros((), mask.dtype))
                hidden, rc = lm.model(ids, mask, rc)
                return j + 1, rc, lm.logits(hidden[:, -1]).astype(jnp.float32)

            logits0 = jnp.zeros((r_batch, lm.cfg.vocab_size), jnp.float32)
            _, rc, logits = jax.lax.while_loop(lambda c: c[0] < self.n_chunks, chunk_step,
                                               (j0, rc, logits0))
            row = dict(
                tok=jnp.zeros((r_batch,), jnp.int32), done=~active,
                stopped=jnp.zeros((r_batch,), bool), count=jnp.zeros((r_batch,), jnp.int32),
                tail=jnp.full((r_batch, tail_len), -1, jnp.int32),
                keys=jax.vmap(lambda r: jax.random.fold_in(rng, r))(reqs),
                tokens=jnp.full((r_batch, n), config.pad_token_id, jnp.int32),
                logprobs=jnp.zeros((r_batch, n), jnp.float32),
            )
            row = _record(row, logits, active, config)
            at = jnp.where(active, slots, b)  # inactive rows: out of range, nothing written

            def put_region(big: jax.Array, new: jax.Array) -> jax.Array:
                if local:
                    return big.at[:, at, :ql].set(new, mode="drop")
                region = _scatter(big[:, :, :ql], new, at, 1)
                return jax.lax.dynamic_update_slice_in_dim(big, region, 0, axis=2)

            mask_rows = jnp.concatenate(
                [rc.mask, jnp.zeros((r_batch, self.cache_len - ql), rc.mask.dtype)], axis=1)
            cache = KVCache(
                k=put_region(cache.k, rc.k), v=put_region(cache.v, rc.v),
                mask=_scatter(cache.mask, mask_rows, at, local=local),
                next_pos=_scatter(cache.next_pos, rc.next_pos, at, local=local),
                index=_scatter(cache.index, jnp.broadcast_to(rc.index, (r_batch,)), at,
                               local=local),
            )
            rows = {k: _scatter(s[k], row[k], at, local=local) for k in per_slot_keys}
            return dict(s, **rows, cache=cache)

        def decode(lm, s):
            """One token for every live slot, each row writing its own next cache slot."""
            self.traces["decode"] += 1
            live = ~s["done"]
            old = s["cache"].index
            logits, cache = lm.decode(s["tok"][:, None], live[:, None].astype(jnp.int32),
                                      s["cache"], last_only=True)
            # A finished row keeps its slot pointer: it writes nothing visible.
            cache = dataclasses.replace(cache, index=jnp.where(live, cache.index, old))
            cache = jax.lax.with_sharding_constraint(cache, state_sh["cache"])
            return _record(dict(s, cache=cache), logits, live, config)

        def run(params, queue_ids, queue_mask, first_chunk, n_req, rng):
            """The whole rollout on device: ``queue_ids [Q, n_chunks x C]`` (``n_req`` real
            requests) through the slots; returns every request's row ``[Q, ...]``."""
            self.traces["run"] += 1
            lm = nnx.merge(graphdef, params, rest)
            q = queue_ids.shape[0]
            slot_ids = jnp.arange(b)
            out = dict(tokens=jnp.full((q, n), config.pad_token_id, jnp.int32),
                       logprobs=jnp.zeros((q, n), jnp.float32),
                       count=jnp.zeros((q,), jnp.int32), stopped=jnp.zeros((q,), bool))
            sched = dict(next_req=jnp.zeros((), jnp.int32),  # the next waiting request
                         refilling=jnp.zeros((), bool),
                         steps=jnp.zeros((), jnp.int32), live_steps=jnp.zeros((), jnp.int32),
                         chunks=jnp.zeros((), jnp.int32))
            carry = dict(s=jax.lax.with_sharding_constraint(init(), state_sh), out=out,
                         **sched)

            def may_start(c):
                """New requests may take the free slots now (``min_free`` rule)."""
                waiting = n_req - c["next_req"]
                n_free = jnp.sum(c["s"]["done"].astype(jnp.int32))
                enough = c["refilling"] | (n_free >= jnp.minimum(min_free, waiting))
                return (waiting > 0) & (n_free > 0) & enough

            def cond(c):
                return ~jnp.all(c["s"]["done"]) | (c["next_req"] < n_req)

            def refill_step(c):
                """Up to ``refill_batch`` waiting requests take the first free slots (their
                finished rows go to ``out`` first: branch-free, the scatters drop a row that is
                not there) and are prefilled together."""
                s = c["s"]
                free = s["done"]
                n_free = jnp.sum(free.astype(jnp.int32))
                k = jnp.minimum(jnp.minimum(n_free, n_req - c["next_req"]), r_batch)
                # The free slots first, in slot order, then the others (never written).
                slots = jnp.argsort(jnp.where(free, slot_ids, b + slot_ids))[:r_batch]
                slots = slots.astype(jnp.int32)
                active = jnp.arange(r_batch) < k
                reqs = jnp.minimum(c["next_req"] + jnp.arange(r_batch, dtype=jnp.int32), q - 1)
                old = _gather(s["owner"], slots, local=local)
                rows = {key: _gather(s[key], slots, local=local) for key in out_keys}
                at = jnp.where(active & (old >= 0), old, q)
                out = {key: c["out"][key].at[at].set(rows[key], mode="drop") for key in out_keys}
                s = dict(s, owner=_scatter(s["owner"], reqs, jnp.where(active, slots, b),
                                           local=local))
                j0 = jnp.min(jnp.where(active, first_chunk[reqs], self.n_chunks - 1))
                s = refill(lm, s, slots, active, reqs, j0, queue_ids, queue_mask, rng)
                return dict(c, s=s, out=out, next_req=c["next_req"] + k, refilling=True,
                            chunks=c["chunks"] + self.n_chunks - j0)

            def decode_step(c):
                live = jnp.sum((~c["s"]["done"]).astype(jnp.int32))
                return dict(c, s=decode(lm, c["s"]), steps=c["steps"] + 1,
                            live_steps=c["live_steps"] + live)

            def decoding(c):
                return ~may_start(c) & ~jnp.all(c["s"]["done"])

            # Refill (every free slot, chunk by chunk), then decode until a refill is due:
            # two while loops in a while loop, not a lax.cond per step, because XLA copies
            # the whole KV cache into and out of a conditional's branches (seen in the
            # compiled program: 2 copies of each of K and V per step); a loop carry is
            # updated in place.
            def body(c):
                c = jax.lax.while_loop(may_start, refill_step, c)
                return jax.lax.while_loop(decoding, decode_step, dict(c, refilling=False))

            c = jax.lax.while_loop(cond, body, carry)
            s = c["s"]
            # The rows still in their slots (the last ones) go to `out` in one scatter.
            at = jnp.where(s["owner"] >= 0, s["owner"], q)
            out = {k: c["out"][k].at[at].set(s[k], mode="drop") for k in out_keys}
            stats = {k: c[k] for k in ("steps", "live_steps", "chunks")}
            return out, stats

        c_len = c
        scalar = replicated
        self._init = jax.jit(init, out_shardings=state_sh)
        self._run = jax.jit(
            run, in_shardings=(self._param_shardings, replicated, replicated, replicated,
                               scalar, scalar),
            out_shardings=replicated)

    def _queue(self, prompts: Sequence[Sequence[int]]):
        """``(ids [Q, L], mask [Q, L], first_chunk [Q])``: each prompt left-padded to the
        queue length ``L = n_chunks x chunk``; ``first_chunk`` is its first chunk that is not
        all padding. Multi-host: every process's prompts, in process order (a collective).
        Rows past the prompts are never read."""
        ids, mask = left_pad(prompts, self.queue_len, self.config.pad_token_id)
        first = np.array([self.n_chunks - -(-len(p) // self.chunk) for p in prompts], np.int32)
        if jax.process_count() > 1:
            ids, mask, first = gather_rows(ids), gather_rows(mask), gather_rows(first)
        q = queue_bucket(len(ids), self.batch_size)
        pad = ((0, q - len(ids)), (0, 0))
        return (np.pad(ids, pad, constant_values=self.config.pad_token_id), np.pad(mask, pad),
                np.pad(first, (0, q - len(first))))

    def lower_rollout(self, n_rows: int):
        """``jax.stages.Lowered`` of the rollout program for ``n_rows`` prompts (abstract
        inputs; for dry runs and HLO checks)."""
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        a_params = jax.tree.map(sds, self._abstract_params, self._param_shardings)
        q = queue_bucket(n_rows, self.batch_size)
        a_ids = jax.ShapeDtypeStruct((q, self.queue_len), jnp.int32)
        a_first = jax.ShapeDtypeStruct((q,), jnp.int32)
        a_n = jax.ShapeDtypeStruct((), jnp.int32)
        a_key = jax.eval_shape(lambda: jax.random.key(0))
        with jax.set_mesh(self.mesh):
            return self._run.lower(a_params, a_ids, a_ids, a_first, a_n, a_key)

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
        n_rows = len(prompts)
        procs, me = jax.process_count(), jax.process_index()
        if procs > 1:  # the module docstring's multi-host contract: the same count everywhere
            longest, most, fewest = (int(v) for v in global_max([longest, n_rows, -n_rows]))
            if most != -fewest:
                raise ValueError(f"generate: the processes hold between {-fewest} and {most} "
                                 "prompts; multi-host sampling needs the same number on each")
        ids, mask, first = self._queue(prompts)
        with jax.set_mesh(self.mesh):
            args = (ids, mask, first, np.int32(n_rows * procs))
            if procs > 1:  # the same queue on every process: replicated global arrays
                rep = NamedSharding(self.mesh, PartitionSpec())
                args = tuple(jax.make_array_from_process_local_data(rep, np.asarray(a))
                             for a in args)
            out, stats = self._run(self._params, *args, rng)
            out, stats = _host_tree((out, stats))
        steps, live = int(stats["steps"]), int(stats["live_steps"])
        self.last_stats = dict(
            decode_steps=steps, prefill_chunks=int(stats["chunks"]), slots=self.batch_size,
            slot_utilisation=live / (steps * self.batch_size) if steps else 1.0,
            queue=len(ids),
        )
        p_len = next(b for b in self.buckets if b >= longest)
        mine = slice(me * n_rows, (me + 1) * n_rows)  # this process's rows of the queue
        return SampleOutput(out["tokens"][mine], out["logprobs"][mine], out["count"][mine],
                            out["stopped"][mine], p_len)


def _host_tree(tree: Any) -> Any:
    """The full value of every array on this host: one transfer when they are all on this
    host, else (multi-host) each replicated array's local copy."""
    if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


ContinuousSampler.multihost = True  # each process passes its own rows (module docstring)
SAMPLERS.register("continuous")(ContinuousSampler)
