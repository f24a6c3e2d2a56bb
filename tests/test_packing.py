"""Packed GRPO updates equal padded ones (loss, metrics, gradients, a whole train step) for
every aggregation mode, with mixed lengths and empty responses; packed sequences never see
each other."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from codescaler_jax.models.sharding import MeshConfig, create_sharded, make_mesh
from codescaler_jax.rl.config import GRPOOptimSection
from codescaler_jax.rl.grpo import (
    UpdateOptions,
    make_minibatch_grads,
    make_train_step,
    per_update_schedule,
    response_token_stats,
)
from codescaler_jax.rl.losses import PolicyLossConfig
from codescaler_jax.rl.packing import (
    make_packed_minibatch_grads,
    make_packed_train_step,
    pack_update_batch,
    packed_logprobs,
)
from codescaler_jax.rm.train_step import (
    init_state,
    make_optimizer,
    make_schedule,
    split_model,
    state_shardings,
)

P, N, B, VOCAB = 6, 10, 8, 64


def _model(seed=0):
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    cfg = Qwen3Config.tiny(vocab_size=VOCAB, num_hidden_layers=2, pad_token_id=0)
    return create_sharded(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(seed)), mesh)


def _batch(seed=0, beta=False):
    """Left-padded prompts, right-padded responses of mixed lengths, two of them empty."""
    rng = np.random.RandomState(seed)
    p_len = rng.randint(1, P + 1, size=B)
    r_len = rng.randint(1, N + 1, size=B)
    r_len[[2, 5]] = 0
    p_mask = (np.arange(P)[None] >= P - p_len[:, None]).astype(np.int32)
    r_mask = (np.arange(N)[None] < r_len[:, None]).astype(np.int32)
    mask = np.concatenate([p_mask, r_mask], 1)
    ids = rng.randint(2, VOCAB, size=(B, P + N)).astype(np.int32)
    batch = {
        "input_ids": np.where(mask == 1, ids, 0).astype(np.int32),
        "attention_mask": mask,
        "response_mask": r_mask,
        "advantages": rng.randn(B).astype(np.float32),
        "old_logp": (np.log(1 / VOCAB) + 0.3 * rng.randn(B, N)).astype(np.float32),
    }
    if beta:
        batch["ref_logp"] = (np.log(1 / VOCAB) + 0.3 * rng.randn(B, N)).astype(np.float32)
    return batch


def _close(a, b, tol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


@pytest.mark.parametrize("mode,beta", [
    ("token-mean", 0.0), pytest.param("seq-mean-token-mean", 0.1, marks=pytest.mark.slow),
    pytest.param("seq-mean-token-sum", 0.0, marks=pytest.mark.slow),
    pytest.param("seq-mean-token-sum-norm", 0.0, marks=pytest.mark.slow),
])
def test_packed_gradient_and_loss_equal_the_padded_ones(mode, beta):
    model = _model()
    graphdef, params, rest = split_model(model)
    cfg = PolicyLossConfig(loss_agg_mode=mode, beta=beta)
    opts = UpdateOptions(loss=cfg, temperature=0.7, logprob_chunk=4)
    host = _batch(1, beta=beta > 0)
    want_g, want_m = jax.jit(make_minibatch_grads(graphdef, rest, opts))(
        params, {k: jnp.asarray(v) for k, v in host.items()})
    # A budget of 20 tokens: several sequences per bin, split over micro-batches.
    packed, stats = pack_update_batch(host, num_minibatches=1, token_budget=20, loss=cfg)
    assert stats["micro_batches"] >= 2 and stats["padding_fraction_packed"] < stats[
        "padding_fraction_padded"]
    assert (packed["segment_ids"].max(-1) >= 2).any()  # bins really hold several sequences
    mini = {k: jnp.asarray(v[0]) for k, v in packed.items()}
    got_g, got_m = jax.jit(make_packed_minibatch_grads(graphdef, rest, opts))(params, mini)
    _close(got_g, want_g)
    assert float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(want_g)))) > 1e-3
    for name in want_m:  # pg_loss / kl_loss are the aggregated loss terms
        _close(got_m[name].value, want_m[name].value)
        _close(got_m[name].weight, want_m[name].weight, 1e-5)


@pytest.mark.slow
def test_packed_train_step_equals_the_padded_one():
    cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean")
    opts = UpdateOptions(loss=cfg, num_minibatches=2, temperature=0.6)
    host = _batch(2)
    optim = GRPOOptimSection(learning_rate=1e-2, warmup_steps=0, eps=1e-2)
    out = []
    for packed in (False, True):
        model = _model(seed=3)
        graphdef, params, rest = split_model(model)
        schedule = make_schedule(optim, 10)
        tx = make_optimizer(optim, per_update_schedule(schedule, opts.num_minibatches))
        mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
        state = init_state(params, tx, state_shardings(model, tx, mesh))
        if packed:
            data, _ = pack_update_batch(host, num_minibatches=2, token_budget=32, loss=cfg)
            step = make_packed_train_step(graphdef, rest, tx, schedule, opts)
        else:
            data = host
            step = make_train_step(graphdef, rest, tx, schedule, opts)
        state, metrics = jax.jit(step)(state, {k: jnp.asarray(v) for k, v in data.items()})
        out.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    _close(out[1][0], out[0][0])
    _close(out[1][1], out[0][1], 1e-5)


def test_packed_sequences_never_see_each_other_and_restart_positions():
    model = _model(seed=5)
    host = _batch(3)
    cfg = PolicyLossConfig()
    packed, _ = pack_update_batch(host, num_minibatches=1, token_budget=40, loss=cfg)
    mb = {k: jnp.asarray(v[0, 0]) for k, v in packed.items() if k != "denominator"}
    logp = np.asarray(jax.jit(packed_logprobs)(model, mb))
    seg = np.asarray(mb["segment_ids"])
    row = int(np.argmax(seg.max(-1)))  # the bin with the most sequences
    assert seg[row].max() >= 3
    # Perturb every token of sequence 2 in that bin (its response log-probs change) ...
    ids = np.asarray(mb["input_ids"]).copy()
    hit = seg == 0
    hit[row] = seg[row] == 2
    hit[:row], hit[row + 1:] = False, False
    ids[hit] = (ids[hit] + 7) % (VOCAB - 2) + 2
    logp2 = np.asarray(jax.jit(packed_logprobs)(model, dict(mb, input_ids=jnp.asarray(ids))))
    loss_pos = np.asarray(mb["loss_mask"]) > 0
    assert np.abs(logp2 - logp)[hit & loss_pos].max() > 1e-3
    # ... and no other sequence's log-probs move at all.
    np.testing.assert_array_equal(logp2[~hit & loss_pos], logp[~hit & loss_pos])
    # Each packed token gets the log-prob of its own padded row (found by its old_logp,
    # random floats copied from that row): positions restart, nothing else is seen.
    stats = nnx.jit(lambda m, ids, mask: response_token_stats(m, ids, mask, N)[0])
    want = np.asarray(stats(model, jnp.asarray(host["input_ids"]),
                            jnp.asarray(host["attention_mask"])))
    flat = {k: jnp.asarray(v[0].reshape(-1, v.shape[-1])) for k, v in packed.items()
            if k != "denominator"}
    all_logp = np.asarray(jax.jit(packed_logprobs)(model, flat))
    all_mask = np.asarray(flat["loss_mask"]) > 0
    old = np.asarray(flat["old_logp"])[all_mask]
    where = [np.argwhere(host["old_logp"] == v) for v in old]
    assert all(len(w) == 1 for w in where)
    rows, cols = np.array([w[0] for w in where]).T
    np.testing.assert_allclose(all_logp[all_mask], want[rows, cols], atol=1e-5)
    assert all_mask.sum() == host["response_mask"].sum()


@pytest.mark.slow
def test_grpo_loop_packed_equals_padded_and_runs_continuous_rollouts(tmp_path, monkeypatch):
    """The trainer hooks: ``algorithm.ppo_max_token_len_per_device`` gives the padded run's
    metrics and parameters; ``rollout.engine=continuous`` (with ``rollout.engine_kwargs``)
    trains too."""
    from test_grpo_train import _cfg, _loop_overrides  # registers the test reward too
    from tiny_rm import save_tiny_rm

    from codescaler_jax.generate.engine import ContinuousSampler
    from codescaler_jax.rl.trainer import GRPOTrainer

    built = []  # the refill_batch of every continuous engine the trainer builds
    init = ContinuousSampler.__init__

    @functools.wraps(init)  # the config checks engine_kwargs against this signature
    def recording_init(self, *args, **kwargs):
        built.append(kwargs.get("refill_batch"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(ContinuousSampler, "__init__", recording_init)
    rm_dir = save_tiny_rm(tmp_path / "rm")
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    runs = {}
    for name, extra in (("padded", []), ("packed", ["algorithm.ppo_max_token_len_per_device=600"]),
                        ("continuous", ["rollout.engine=continuous",
                                        "rollout.engine_kwargs={refill_batch: 2, min_free: 2}"])):
        trainer = GRPOTrainer(_cfg(_loop_overrides(tmp_path / name, rm_dir, 2) + extra),
                              progress=False, mesh=mesh)
        runs[name] = (trainer.run(), jax.device_get(trainer.state["params"]))
    (a, pa), (b, pb) = runs["padded"], runs["packed"]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha.keys() == hb.keys()
        for k, v in ha.items():
            if v is None:  # not measured in either run (pass_rate with reward.pass_rate=false)
                assert hb[k] is None, k
            elif not k.startswith("time/") and "per_s" not in k and "mfu" not in k:
                np.testing.assert_allclose(hb[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # Adam divides each gradient by its own RMS, so a parameter whose gradient is at the
    # float-noise level (an embedding row barely touched) moves by O(lr) on noise: measured,
    # 1 of 4.85M elements off by 1.5e-4 after two steps; everything else agrees to 1e-5.
    diffs = [np.abs(x - y) for x, y in zip(jax.tree.leaves(pb), jax.tree.leaves(pa))]
    assert sum(int((d > 1e-5).sum()) for d in diffs) <= 10
    assert max(float(d.max()) for d in diffs) < 1e-3
    assert runs["continuous"][0]["steps_run"] == 2
    assert built == [2]  # rollout.engine_kwargs reached the engine


def test_bins_respect_the_budget_and_micro_batches_round_to_buckets():
    from codescaler_jax.rl.packing import first_fit, micro_bucket

    lengths = np.array([5, 3, 8, 2, 7, 10, 1])
    bins = first_fit(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(lengths[b].sum() <= 10 for b in bins) and len(bins) == 4  # 36 tokens: 4 bins
    with pytest.raises(ValueError, match="token_budget=10"):
        first_fit(np.array([11]), 10)
    assert [micro_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13)] == [1, 2, 3, 4, 6, 8, 12, 16]


@pytest.mark.parametrize("split", [4, 3])
def test_packing_a_block_of_rows_keeps_the_global_mini_batches(split):
    """Multi-host, a process packs only its block of rows (``row_offset`` = the block's first
    global row): each mini-batch then holds the same sequences as in a packing of the whole
    batch (row r in mini-batch r mod n by its global index, also for an odd block start),
    and the blocks' denominators add up to the whole batch's."""
    host = _batch(4)
    cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean")
    kw = dict(num_minibatches=2, token_budget=24, loss=cfg)
    whole, _ = pack_update_batch(host, **kw)
    blocks = [pack_update_batch({k: v[rows] for k, v in host.items()}, row_offset=rows.start,
                                **kw)[0]
              for rows in (slice(0, split), slice(split, len(host["advantages"])))]

    def sequences(packed, j):  # mini-batch j's (tokens, advantage) of every packed sequence
        out = []
        for ids, seg, adv in zip(packed["input_ids"][j].reshape(-1, 24),
                                 packed["segment_ids"][j].reshape(-1, 24),
                                 packed["advantages"][j].reshape(-1, 24), strict=True):
            for s in range(1, seg.max() + 1):
                at = seg == s
                out.append((tuple(ids[at]), round(float(adv[at].sum()), 5)))
        return sorted(out)

    for j in range(2):
        assert sequences(whole, j) == sorted(sequences(blocks[0], j) + sequences(blocks[1], j))
        assert sequences(whole, j)  # not vacuous
    np.testing.assert_allclose(blocks[0]["denominator"] + blocks[1]["denominator"],
                               whole["denominator"], rtol=1e-6)
