"""Packed GRPO updates: sequences packed into fixed token budgets instead of padded rows.

The padded update runs every row as ``[P + N]`` tokens (prompt bucket + response bucket);
with skewed response lengths most of those are padding. ``pack_update_batch`` moves each
row's real tokens (its prompt, then its response) into bins of ``token_budget`` tokens (the
reference's ``ppo_max_token_len_per_gpu``), first-fit by decreasing length, per mini-batch.
A bin is one row of the model's input with:

- ``segment_ids``: sequence ``i`` of the bin has segment ``i + 1`` (padding: 0, invalid), so
  attention never crosses sequences (``models.attention``'s segment rule);
- ``positions``: 0, 1, ... restarting at every sequence, as in its own padded row;
- per position ``t``, the next-token target and the loss inputs of the response token it
  predicts (``loss_mask``, ``old_logp``, ``ref_logp``, ``advantages``), and the aggregation
  weights of ``losses.aggregation_weights``, counted on the *unpacked* response mask.

Exactness: each mini-batch's global denominator (``losses.loss_denominator``) is counted
before packing, and every aggregation mode becomes ``sum(w * loss) / denominator`` with per
token weights from the original rows, so loss and gradient equal the padded update's (up to
float summation order; tested to 1e-6), whatever bins the rows land in. Rows whose response
mask is empty contribute nothing in either layout and are left out of the bins.

Static shapes: the bins of a mini-batch are grouped ``rows_per_micro`` at a time (a multiple
of the mesh's data x fsdp size, so micro-batches shard like padded rows) into micro-batches;
their count is rounded up to a bucket (``micro_bucket``: 1, 2, 3, 4, 6, 8, 12, ...), so the
jitted step compiles once per bucket, not per batch. ``pred_index [.., R]`` lists each bin's
positions that predict a response token (``R`` rounded up to a power of two, ``pred_bucket``): the
LM head runs on those alone, as the padded update runs it on the response slice only (with a
large vocabulary the head dominates, and a bin's prompt positions would otherwise pay for it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codescaler_jax.distributed import gather_rows, global_max, local_rows
from codescaler_jax.rl.grpo import UpdateOptions, make_train_step
from codescaler_jax.rl.losses import (
    PolicyLossConfig,
    WeightedMean,
    aggregation_weights,
    loss_denominator,
    policy_loss,
)

PACKED_KEYS = ("input_ids", "valid", "segment_ids", "positions", "targets", "loss_mask",
               "old_logp", "advantages", "weight", "den_weight", "pred_index")


def first_fit(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of total <= ``budget``, first fit by decreasing length."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):
        n = int(lengths[i])
        if n > budget:
            raise ValueError(f"a sequence of {n} tokens does not fit token_budget={budget}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(budget - n)
    return bins


def micro_bucket(n: int) -> int:
    """Micro-batches per mini-batch, rounded up to 1, 2, 3, 4, 6, 8, 12, 16, ... (a power of
    two or 1.5 times one): at most two compiled shapes per doubling, at most 1/3 empty bins
    (a power of two alone would waste up to half)."""
    p = 1 << max(n - 1, 0).bit_length()
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= n else p


def pred_bucket(n: int, budget: int) -> int:
    """Prediction positions per bin, rounded up to a power of two (at least 16), at most
    ``budget``: one compiled shape per doubling. Finer buckets recompiled the update on most
    steps of a small run (about 8 s each on CPU against a 4 s step) for a smaller saving."""
    return min(budget, max(16, 1 << (max(n, 1) - 1).bit_length()))


def pack_update_batch(
    batch: Mapping[str, np.ndarray],
    *,
    num_minibatches: int,
    token_budget: int,
    loss: PolicyLossConfig,
    rows_per_micro: int = 1,
    row_offset: int = 0,
    across_processes: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Pack a padded GRPO batch into token-budget bins.

    Args:
        batch: host arrays ``input_ids``/``attention_mask [B, P + N]`` (prompt left-padded,
            response right-padded), ``response_mask [B, N]``, ``advantages [B]``,
            ``old_logp [B, N]`` and optionally ``ref_logp [B, N]``.
        num_minibatches: rows split as ``grpo.split_rows`` (row r in mini-batch r mod n).
        token_budget: tokens per bin.
        loss: gives the aggregation mode (the denominators and weights).
        rows_per_micro: bins per micro-batch.
        row_offset: the global index of ``batch``'s first row (multi-host: this process's
            rows are a block of the global batch; mini-batches follow the global index).
        across_processes: ``batch`` is this process's rows only (a collective): the
            micro-batch count is the largest any process needs and each denominator is the
            sum of every process's, so every process packs its own rows into its own bins
            and the global arrays are the processes' blocks side by side.

    Returns:
        ``(packed, stats)``: ``packed`` holds ``PACKED_KEYS`` (+ ``ref_logp``) as
        ``[num_minibatches, U, rows_per_micro, token_budget]`` and ``denominator
        [num_minibatches]``; ``stats`` the padding fractions of both layouts.
    """
    ids, attn = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"])
    resp = np.asarray(batch["response_mask"])
    b, n = resp.shape
    p = ids.shape[1] - n
    mode, const = loss.loss_agg_mode, loss.loss_agg_constant
    const = float(n) if const is None else const  # C of the padded layout, as there
    w, dw = (np.asarray(x) for x in aggregation_weights(jnp.asarray(resp), mode,
                                                         norm_constant=const))
    has_ref = "ref_logp" in batch
    per_row = {"old_logp": np.asarray(batch["old_logp"]), "weight": w, "den_weight": dw}
    if has_ref:
        per_row["ref_logp"] = np.asarray(batch["ref_logp"])
    adv = np.asarray(batch["advantages"], np.float32)

    prompt_len = attn[:, :p].sum(1)
    resp_len = attn[:, p:].sum(1)
    seq_len = prompt_len + resp_len
    minis = [np.flatnonzero((np.arange(b) + row_offset) % num_minibatches == j)
             for j in range(num_minibatches)]
    bins_of = []
    for rows in minis:
        keep = rows[resp[rows].any(1)]
        bins_of.append([keep[i] for i in first_fit(seq_len[keep], token_budget)])
    needed = max(-(-len(bins) // rows_per_micro) for bins in bins_of)
    if across_processes:
        needed = int(global_max(needed))
    u = micro_bucket(needed)
    # The positions that predict a response token, per bin (the LM head runs on these only).
    preds = max((int(resp_len[m].sum()) for bins in bins_of for m in bins), default=1)
    if across_processes:
        preds = int(global_max(preds))
    r_len = pred_bucket(preds, token_budget)
    shape = (num_minibatches, u * rows_per_micro, token_budget)
    out = {k: np.zeros(shape, np.float32 if k in ("old_logp", "advantages", "weight",
                                                     "den_weight", "ref_logp") else np.int32)
           for k in (*PACKED_KEYS, *(("ref_logp",) if has_ref else ())) if k != "pred_index"}
    # out of range (token_budget) marks an unused entry: gathered clamped, scattered dropped
    out["pred_index"] = np.full((*shape[:2], r_len), token_budget, np.int32)
    for j, bins in enumerate(bins_of):
        for slot, members in enumerate(bins):
            at, n_pred = 0, 0
            for seg, r in enumerate(members):
                pl, rl = int(prompt_len[r]), int(resp_len[r])
                tokens = np.concatenate([ids[r, p - pl:p], ids[r, p:p + rl]])
                span = slice(at, at + pl + rl)
                out["input_ids"][j, slot, span] = tokens
                out["valid"][j, slot, span] = 1
                out["segment_ids"][j, slot, span] = seg + 1
                out["positions"][j, slot, span] = np.arange(pl + rl)
                # Position at + pl - 1 + i predicts response token i.
                pred = slice(at + pl - 1, at + pl - 1 + rl)
                out["targets"][j, slot, pred] = ids[r, p:p + rl]
                out["loss_mask"][j, slot, pred] = resp[r, :rl]
                out["advantages"][j, slot, pred] = adv[r]
                for k, v in per_row.items():
                    out[k][j, slot, pred] = v[r, :rl]
                out["pred_index"][j, slot, n_pred:n_pred + rl] = np.arange(pred.start, pred.stop)
                n_pred += rl
                at += pl + rl
    packed = {k: v.reshape(num_minibatches, u, rows_per_micro, v.shape[-1])
              for k, v in out.items()}
    den = np.asarray(
        [float(loss_denominator(jnp.asarray(resp[rows]), mode, norm_constant=const))
         for rows in minis], np.float32)
    # (padded tokens, packed tokens, real tokens, tokens of the padded rows)
    counts = np.asarray([b * (p + n), np.prod(shape), seq_len[resp.any(1)].sum(), attn.sum()],
                        np.float64)
    if across_processes:  # denominators add over rows, so over processes
        den = gather_rows(den[None]).sum(0).astype(np.float32)
        counts = gather_rows(counts[None]).sum(0)
    packed["denominator"] = den
    padded, packed_tokens, real, used = (float(x) for x in counts)
    stats = {
        "padded_tokens": padded,
        "packed_tokens": packed_tokens,
        "real_tokens": real,
        "padding_fraction_padded": 1.0 - used / padded,
        "padding_fraction_packed": 1.0 - real / packed_tokens,
        "micro_batches": float(u),
    }
    return packed, stats


def pack_on_mesh(batch: Mapping[str, jax.Array], mesh: Any, *, num_minibatches: int,
                 token_budget: int, loss: PolicyLossConfig) -> tuple[dict[str, jax.Array],
                                                                 dict[str, float]]:
    """``pack_update_batch`` of a global (device) batch, put back on ``mesh``: one bin per
    data x fsdp shard in each micro-batch, the bins split over ``('data', 'fsdp')``.

    Multi-host, every process packs only the rows its own devices hold (its block of the
    global batch, ``distributed.local_rows``; process ``p``'s block is the ``p``-th, as
    ``distributed.rows_to_global`` builds it) into the bins its devices hold: no process
    gathers another's rows. The bins differ from a one-process packing of the same batch,
    but loss and gradients do not (each denominator is global, counted before packing)."""
    from jax.sharding import NamedSharding, PartitionSpec

    bins = NamedSharding(mesh, PartitionSpec(None, None, ("data", "fsdp")))
    whole = NamedSharding(mesh, PartitionSpec())
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    local = {k: local_rows(v) for k, v in batch.items()}
    rows = len(local["response_mask"])
    packed, stats = pack_update_batch(local, num_minibatches=num_minibatches,
                                      token_budget=token_budget, loss=loss,
                                      rows_per_micro=local_bin_count(mesh),
                                      row_offset=jax.process_index() * rows,
                                      across_processes=jax.process_count() > 1)
    out = {}
    for k, v in packed.items():
        if v.ndim == 1:  # the denominators: the same on every process
            out[k] = jax.make_array_from_process_local_data(whole, v, v.shape)
        else:
            shape = (*v.shape[:2], ways, *v.shape[3:])
            out[k] = jax.make_array_from_process_local_data(bins, v, shape)
    return out, stats


def local_bin_count(mesh: Any) -> int:
    """How many of the ``data x fsdp`` positions of ``mesh`` this process's devices hold
    (its devices along ``tensor`` replicate the same bins)."""
    names = list(mesh.axis_names)
    keep = [names.index("data"), names.index("fsdp")]
    me = jax.process_index()
    mine = np.vectorize(lambda d: d.process_index == me, otypes=[bool])(mesh.devices)
    return len({tuple(c[keep]) for c in np.argwhere(mine)})


def packed_logprobs(model: Any, mb: Mapping[str, jax.Array], temperature: float = 1.0,
                    chunk: int | None = None) -> jax.Array:
    """``log_softmax(logits / T)`` of each position's target, ``[k, T]`` for packed rows
    (the padded path's ``grpo.response_token_stats``, on the packed layout).

    With ``pred_index [k, R]`` (``pack_update_batch`` writes it) the LM head runs only on the
    ``R`` positions that predict a response token, as the padded path runs it on the response
    slice alone; every other position's value is 0 (the loss masks it)."""
    hidden = model.hidden_states(mb["input_ids"], mb["valid"], segment_ids=mb["segment_ids"],
                                 positions=mb["positions"])
    targets = mb["targets"]
    k, t = targets.shape
    index = mb.get("pred_index")
    if index is None:
        return _target_logprobs(model, hidden, targets, temperature, chunk)
    at = jnp.minimum(index, t - 1)  # unused entries (index t) read the last position
    h = jnp.take_along_axis(hidden, at[..., None], axis=1)
    lp = _target_logprobs(model, h, jnp.take_along_axis(targets, at, axis=1), temperature, chunk)
    rows = jnp.arange(k)[:, None]
    return jnp.zeros((k, t), lp.dtype).at[rows, index].set(lp, mode="drop")


def _target_logprobs(model: Any, hidden: jax.Array, targets: jax.Array, temperature: float,
                     chunk: int | None) -> jax.Array:
    """``log_softmax(model.logits(hidden) / T)`` at ``targets`` (``[k, n]``), the LM head
    over ``chunk`` positions at a time (rematerialised in the backward) when given."""

    def stats(h: jax.Array, tgt: jax.Array) -> jax.Array:
        logits = model.logits(h) / temperature
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    k, t = targets.shape
    if chunk is None or chunk >= t:
        return stats(hidden, targets)
    pad = (-t) % chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(k, -1, chunk, hidden.shape[-1])
    tgt = jnp.pad(targets, ((0, 0), (0, pad))).reshape(k, -1, chunk)
    out = jax.lax.map(lambda xs: jax.checkpoint(stats)(*xs), (h.swapaxes(0, 1),
                                                             tgt.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(k, t + pad)[:, :t]


def make_packed_minibatch_grads(
    graphdef: nnx.GraphDef, rest: nnx.State, opts: UpdateOptions
) -> Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, WeightedMean]]]:
    """``grads(params, minibatch)`` of one packed mini-batch (``[U, k, T]`` arrays plus the
    scalar ``denominator``), accumulated over its ``U`` micro-batches."""
    cfg = opts.loss

    def loss_fn(params, mb, denominator):
        model = nnx.merge(graphdef, params, rest)
        logp = packed_logprobs(model, mb, opts.temperature, opts.logprob_chunk)
        return policy_loss(
            logp, mb["old_logp"], mb["advantages"], mb["loss_mask"], cfg=cfg,
            ref_logp=mb.get("ref_logp"), global_denominator=denominator,
            token_weights=(mb["weight"], mb["den_weight"]),
        )

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def grads(params, minibatch):
        micro = {k: v for k, v in minibatch.items() if k != "denominator"}
        den = minibatch["denominator"]
        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(grad_fn, params, first, den)

        def body(acc, mb):
            return jax.tree.map(jnp.add, acc, grad_fn(params, mb, den)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        return jax.lax.scan(body, zeros, micro)[0]

    return grads


def make_packed_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: Any, schedule: Any,
                           opts: UpdateOptions) -> Callable[[dict, dict], tuple[dict, dict]]:
    """``grpo.make_train_step`` on a ``pack_update_batch`` batch (same state and metrics)."""
    return make_train_step(graphdef, rest, tx, schedule, opts,
                           minibatch_grads=make_packed_minibatch_grads(graphdef, rest, opts))
