"""Grain input pipeline for RM training: tokenized pairs -> shuffled, bucketed, per-process batches.

Pairs are tokenized once on the host (RM chat template, right truncation). The Grain pipeline
then works on indices: shuffle with a seed (reshuffled each epoch), batch the *global* batch,
and give each JAX process its own contiguous rows of every global batch, so processes read
disjoint parts of the data and, together, all of it; the padded length (a bucket) is chosen
from the whole global batch so that every process builds arrays of the same shape.
Iterator state (``get_state`` / ``set_state``) is a small dict saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
from tqdm.auto import tqdm

from codescaler_jax.data.pairs import Pair
from codescaler_jax.data.tokenizer import bucket_length, encode_rm_inputs, pad_right


@dataclasses.dataclass
class TokenizedPairs:
    """Token ids of each pair's chosen and rejected RM input (int32 arrays, ragged)."""

    chosen: list[np.ndarray]
    rejected: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> np.ndarray:
        """``[N]`` the longer side of each pair, in tokens."""
        return np.array(
            [max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], dtype=np.int64
        )


def tokenize_pairs(
    pairs: Sequence[Pair],
    tokenizer,
    max_length: int,
    *,
    chunk: int = 256,
    progress: bool = True,
) -> TokenizedPairs:
    """Render and tokenize both sides of every pair (user=problem, assistant=code)."""
    chosen: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    bar = tqdm(total=len(pairs), desc="tokenize", unit="pair", disable=not progress, leave=False)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        probs = [p.problem for p in part]
        c = encode_rm_inputs(tokenizer, probs, [p.chosen for p in part], max_length)
        r = encode_rm_inputs(tokenizer, probs, [p.rejected for p in part], max_length)
        chosen.extend(np.asarray(x, np.int32) for x in c)
        rejected.extend(np.asarray(x, np.int32) for x in r)
        bar.update(len(part))
    bar.close()
    return TokenizedPairs(chosen, rejected)


def drop_identical(
    pairs: Sequence[Pair], tokens: TokenizedPairs
) -> tuple[list[Pair], TokenizedPairs, int]:
    """Drop pairs whose chosen and rejected RM inputs are the same token ids (after
    truncation: two codes that differ only past ``max_length``). Such a pair carries no
    preference: the model must score both sides the same, so it can be neither learned nor
    judged. Returns the kept pairs, their tokens and how many were dropped."""
    keep = [
        i for i, (c, r) in enumerate(zip(tokens.chosen, tokens.rejected))
        if len(c) != len(r) or not np.array_equal(c, r)
    ]
    kept = TokenizedPairs([tokens.chosen[i] for i in keep], [tokens.rejected[i] for i in keep])
    return [pairs[i] for i in keep], kept, len(pairs) - len(keep)


def make_buckets(max_length: int, smallest: int = 64, per_octave: int = 1) -> tuple[int, ...]:
    """Buckets from ``smallest`` up to ``max_length`` (always the last): powers of two, or with
    ``per_octave=2`` also the midpoints (128, 192, 256, 384, 512): less padding, more shapes
    to compile."""
    out = []
    b = smallest
    while b < max_length:
        out.append(b)
        if per_octave > 1:
            mid = b + b // 2
            if mid < max_length:
                out.append(mid)
        b *= 2
    out.append(max_length)
    return tuple(out)


def grouped_batches(
    lengths: np.ndarray, batch_size: int, *, seed: int, num_epochs: int, window: int = 32
) -> list[np.ndarray]:
    """Index batches of similar length: each epoch is shuffled (seeded), cut into windows of
    ``window`` batches, sorted by length inside each window and batched; the batch order is
    then shuffled. Less padding than random batches, still a different mix every epoch. The
    remainder of an epoch (fewer than ``batch_size`` pairs) is dropped."""
    n = len(lengths)
    out: list[np.ndarray] = []
    for epoch in range(num_epochs):
        rng = np.random.default_rng([seed, epoch])
        perm = rng.permutation(n)[: (n // batch_size) * batch_size]
        epoch_batches = []
        for start in range(0, len(perm), batch_size * window):
            chunk = perm[start : start + batch_size * window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            epoch_batches.extend(
                chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)
            )
        out.extend(epoch_batches[i] for i in rng.permutation(len(epoch_batches)))
    return out


class _Collate:
    """Global batch of pair indices -> this process's padded arrays (module-level: picklable)."""

    def __init__(self, data: TokenizedPairs, buckets, pad_id, process_index, process_count):
        self.data = data
        self.lengths = data.lengths()
        self.buckets = tuple(sorted(buckets))
        self.pad_id = pad_id
        self.process_index = process_index
        self.process_count = process_count

    def __call__(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx)
        length = bucket_length(int(self.lengths[idx].max()), self.buckets)
        per = len(idx) // self.process_count
        mine = idx[self.process_index * per : (self.process_index + 1) * per]
        c_ids, c_mask = pad_right([self.data.chosen[i] for i in mine], length, self.pad_id)
        r_ids, r_mask = pad_right([self.data.rejected[i] for i in mine], length, self.pad_id)
        return {
            "chosen_ids": c_ids,
            "chosen_mask": c_mask,
            "rejected_ids": r_ids,
            "rejected_mask": r_mask,
            "index": mine.astype(np.int64),
        }


def pair_batches(
    data: TokenizedPairs,
    *,
    global_batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
    seed: int,
    num_epochs: int | None = 1,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    group_by_length: bool = False,
) -> grain.MapDataset:
    """Grain ``MapDataset`` of this process's batches (global_batch_size / process_count rows).

    Each element: ``chosen_ids, chosen_mask, rejected_ids, rejected_mask`` ``[b, L]`` int32 with
    ``L`` the bucket of the longest pair in the global batch, and ``index [b]`` (pair indices).
    ``group_by_length``: batches of similar length (``grouped_batches``), less padding.
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by {process_count} processes"
        )
    if len(data) == 0:
        raise ValueError("no pairs to batch")
    collate = _Collate(data, buckets, pad_id, process_index, process_count)
    if group_by_length:
        if num_epochs is None or not shuffle or not drop_remainder:
            raise ValueError("group_by_length needs a number of epochs, shuffle, drop_remainder")
        order = grouped_batches(data.lengths(), global_batch_size, seed=seed, num_epochs=num_epochs)
        return grain.MapDataset.source(order).map(collate)
    ds = grain.MapDataset.range(len(data))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    ds = ds.batch(global_batch_size, drop_remainder=drop_remainder, batch_fn=np.asarray)
    return ds.map(collate)


def eval_batches(data: TokenizedPairs, *, batch_size: int, buckets, pad_id: int):
    """Held-out batches in order, the last one padded with repeats and a ``weight`` of 0."""
    n = len(data)
    collate = _Collate(data, buckets, pad_id, 0, 1)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        weight = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            weight[len(idx) :] = 0.0
            idx = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
        batch = collate(idx)
        batch["weight"] = weight
        yield batch
