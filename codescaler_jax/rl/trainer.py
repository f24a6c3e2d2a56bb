"""The GRPO loop: rollout -> reward -> advantages -> update, with logging and checkpoints.

``GRPOTrainer(cfg).run()`` does everything ``python -m codescaler_jax.train_grpo`` does. Per
step: take ``num_prompts`` problems from the prompt iterator, sample ``num_generations``
responses for each (``JaxSampler``, current policy), score them (the registered reward), turn
rewards into group advantages, recompute the actor's log-probs (and the reference's when
``beta > 0``), and run the jitted train step (``num_minibatches`` optimizer updates).

A run directory holds ``config.yaml``, ``tb/`` (TensorBoard: reward mean/std, valid-code
fraction, pass rate, response length, clip fraction, approx KL, entropy, grad norm, learning
rate, time per phase, tokens/s, the sampler-learner KL ``rollout/sampler_learner_kl``; rollout
text samples), ``checkpoints/`` (Orbax: train state,
prompt-iterator state, RNG key), ``hf/`` (the policy in Hugging Face format),
``log.p<process>.txt`` and ``summary.json``. ``resume=True`` continues exactly from the latest
checkpoint: the RNG of step ``s`` is ``fold_in(key, s)``, so a resumed run draws the same
samples as an uninterrupted one.

Multi-host (``jax.distributed``, one process per host; ``python -m codescaler_jax.train_grpo``
joins them as ``train_rm`` does): the step's ``num_prompts`` prompts come from one global
shuffle (the same Grain pipeline and seed on every process) and process ``p`` keeps the
``p``-th of ``process_count`` equal slices of each step's prompts, with all
``num_generations`` responses of each of them. A group therefore never spans processes, so the
group advantages are computed from the process's own rewards with no gather
(``scale_rewards: batch`` alone gathers the step's rewards, for their std). Each process
samples its rows (``JaxSampler``: global decode batches built from every process's rows),
decodes, extracts and sandboxes them, the RM scores them on the global mesh
(``RewardScorer``), and the update batch is assembled from every process's rows
(``jax.make_array_from_process_local_data``; process ``p``'s rows are the ``p``-th block, the
order one process would use). Only the step's small host figures are gathered: padded lengths
and, for the logged metrics, rewards, lengths and extraction outcomes. The prompt iterator's
checkpointed state is the global position, from which each process's slice follows, so
``--resume`` is exact on any process count that divides ``num_prompts``. Every process saves
and restores the Orbax checkpoints; process 0 alone writes TensorBoard (with its own first
rows as the text samples), ``hf/`` and ``summary.json``; each process logs to
``log.p<process>.txt``. The pass-rate probes split their rows the same way (``rl.metrics``).
With one decode loop per step (``rollout.batch_size`` >= the step's responses) the samples
equal those of one process on the same mesh; with the ``continuous`` rollout engine (one
queue of every process's prompts through the global slots) they always do.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from codescaler_jax.code.extract import Extraction
from codescaler_jax.config import ConfigError, to_dict
from codescaler_jax.data.problems import Problem, humaneval_problems, read_problems_jsonl
from codescaler_jax.data.tokenizer import load_tokenizer, resolve_tokenizer_path
from codescaler_jax.distributed import (
    assert_shared_directory,
    gather_json,
    gather_rows,
    global_max,
    rows_to_global,
)
from codescaler_jax.eval.sampling import render_prompts
from codescaler_jax.generate.sampler import (
    SAMPLERS,
    SampleOutput,
    SamplingConfig,
    left_pad,
    prompt_buckets,
    stop_sequences_from_strings,
)
from codescaler_jax.logging_utils import Writer
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from codescaler_jax.models.sharding import batch_sharding, create_sharded, make_mesh
from codescaler_jax.rl.advantages import compute_advantages
from codescaler_jax.rl.config import GRPOConfig
from codescaler_jax.rl.grpo import (
    UpdateOptions,
    make_logprob_fn,
    make_train_step,
    per_update_schedule,
    sampler_learner_drift,
)
from codescaler_jax.rl.metrics import PassRateProbe, build_probe
from codescaler_jax.rl.packing import make_packed_train_step, pack_on_mesh
from codescaler_jax.rl.rewards import RewardResult, RolloutBatch, build_reward, close_reward
from codescaler_jax.training import loop
from codescaler_jax.training.checkpoint import RunCheckpoints
from codescaler_jax.training.optim import make_optimizer, make_schedule
from codescaler_jax.training.run_dir import GRPO_RESUME, claim_run_dir
from codescaler_jax.training.state import init_state, split_model, state_shardings

log = logging.getLogger("codescaler_jax")

def policy_config(cfg: GRPOConfig, vocab_min: int, pad_id: int, eos_id: int) -> Qwen3Config:
    """Qwen3Config of a from-scratch policy: ``policy.size`` with the section's overrides."""
    return cfg.policy.sized_config(vocab_min=vocab_min, pad_token_id=pad_id, eos_token_id=eos_id)


def load_problems(cfg: GRPOConfig) -> list[Problem]:
    """The prompt set named by ``data.source``."""
    src = cfg.data.source
    problems = humaneval_problems() if src == "humaneval" else read_problems_jsonl(src)
    if cfg.data.max_problems is not None:
        problems = problems[: cfg.data.max_problems]
    return problems


def response_buckets(max_new_tokens: int, smallest: int) -> tuple[int, ...]:
    """Padded response lengths of the update (few shapes -> few compilations)."""
    return prompt_buckets(max_new_tokens, smallest)


def build_update_batch(
    prompts: list[list[int]], out: SampleOutput, pad_id: int, buckets: tuple[int, ...],
    longest: int | None = None,
) -> dict[str, np.ndarray]:
    """Host arrays of one update: ``input_ids``/``attention_mask`` ``[B, P + N]`` (left-padded
    prompt then right-padded response), ``response_mask [B, N]``; N is the bucket of the longest
    response (``longest``, when given: of every process's rows)."""
    if longest is None:
        longest = int(out.lengths.max()) if len(out.lengths) else 1
    n = next(b for b in buckets if b >= max(longest, 1))
    p_ids, p_mask = left_pad(prompts, out.prompt_len, pad_id)
    r_mask = (np.arange(n)[None, :] < out.lengths[:, None]).astype(np.int32)
    r_ids = np.where(r_mask == 1, out.tokens[:, :n], pad_id).astype(np.int32)
    return {
        "input_ids": np.concatenate([p_ids, r_ids], axis=1),
        "attention_mask": np.concatenate([p_mask, r_mask], axis=1),
        "response_mask": r_mask,
    }


def decode_responses(tokenizer, out: SampleOutput, eos_ids: tuple[int, ...]) -> list[str]:
    """Response text of each row, the final EOS token removed (as the reference does)."""
    texts = []
    for toks, n in zip(out.tokens, out.lengths, strict=True):
        toks = list(toks[: int(n)])
        if toks and toks[-1] in eos_ids:
            toks = toks[:-1]
        texts.append(tokenizer.decode(toks, skip_special_tokens=False))
    return texts


def step_metrics(res: RewardResult, out: SampleOutput, mask: np.ndarray,
                 update: dict[str, float], entropy: float | None, adv: np.ndarray,
                 times: tuple[float, float, float, float]) -> dict[str, float]:
    """The metrics of one GRPO step: reward, validity, response lengths, advantages, the
    update's clip / KL / entropy, time per phase and throughput."""
    t0, t1, t2, t3 = times
    gen_tokens = float(out.lengths.sum())
    trained_tokens = float(mask.sum())
    m = {
        "reward/mean": float(res.rewards.mean()),
        "reward/std": float(res.rewards.std()),
        "reward/max": float(res.rewards.max()),
        "valid_code_fraction": float(res.valid.mean()),
        "response_length/mean": float(out.lengths.mean()),
        "response_length/max": float(out.lengths.max()),
        "response_length/truncated_fraction": float(1.0 - out.stopped.mean()),
        "advantage/zero_fraction": float(np.mean(adv == 0)),
        "clip_fraction": update["clipfrac_high"] + update["clipfrac_low"],
        "time/rollout_s": t1 - t0,
        "time/reward_s": t2 - t1,
        "time/update_s": t3 - t2,
        "time/step_s": t3 - t0,
        "rollout/tokens_per_s": gen_tokens / max(t1 - t0, 1e-9),
        "update/tokens_per_s": trained_tokens / max(t3 - t2, 1e-9),
        **update,
        **res.metrics,
    }
    if entropy is not None:  # None: no recompute pass (algorithm.old_logprobs=sampler)
        m["entropy"] = entropy
    if res.passed is not None:
        m["pass_rate"] = float(res.passed.mean())
    return m


class GRPOTrainer:
    """Builds every piece of a GRPO run from its config and runs it."""

    def __init__(self, cfg: GRPOConfig, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, mesh: Mesh | None = None):
        """``mesh``: run on this mesh instead of ``make_mesh(cfg.mesh)`` over all devices.
        ``overwrite``: delete a previous run in ``run_dir`` first (else a used directory is
        refused unless ``resume``; see ``codescaler_jax.training.run_dir``)."""
        self.cfg = cfg
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.mesh = mesh
        self.run_dir = Path(cfg.run_dir)
        self._prepared = False

    def prepare(self) -> None:
        """Check the input paths and claim the run directory (``InputError`` when refused)
        before any model or data work. Called by `run`."""
        if self._prepared:
            return
        self.cfg.check_paths()
        claim_run_dir(self.run_dir, self.cfg, resume=self.resume, overwrite=self.overwrite,
                      policy=GRPO_RESUME)
        self._prepared = True

    # ------------------------------------------------------------------ pieces
    def build_policy(self, mesh, tokenizer) -> Qwen3ForCausalLM:
        p = self.cfg.policy
        if p.init_from:
            from codescaler_jax.models.hf_io import load_hf_model

            return load_hf_model(p.init_from, Qwen3ForCausalLM, mesh=mesh,
                                 **p.compute_overrides())
        mcfg = policy_config(self.cfg, len(tokenizer), tokenizer.pad_token_id,
                             tokenizer.eos_token_id)
        seed = self.cfg.train.seed
        return create_sharded(lambda: Qwen3ForCausalLM(mcfg, rngs=nnx.Rngs(seed)), mesh)

    def sampling_config(self, tokenizer, model_cfg: Qwen3Config) -> SamplingConfig:
        r = self.cfg.rollout
        eos = {int(tokenizer.eos_token_id)}
        model_eos = model_cfg.eos_token_id
        if model_eos is not None:
            eos |= set(model_eos) if isinstance(model_eos, tuple) else {int(model_eos)}
        return SamplingConfig(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, eos_token_ids=tuple(sorted(eos)),
            stop_sequences=stop_sequences_from_strings(tokenizer, r.stop_strings),
            pad_token_id=int(tokenizer.pad_token_id), prefill_chunk=r.prefill_chunk,
        )

    def prompt_iterator(self, n: int):
        """Endless shuffled batches of problem indices (reshuffled every epoch), checkpointable.
        Multi-host: this process's slice of each step's batch (module docstring); the state
        is the global position, the same on every process."""
        r = self.cfg.rollout
        ds = grain.MapDataset.range(n).shuffle(seed=self.cfg.train.seed).repeat(None)
        ds = ds.batch(r.num_prompts, drop_remainder=True, batch_fn=np.asarray)
        procs = jax.process_count()
        if procs > 1:
            per, p = r.num_prompts // procs, jax.process_index()
            ds = ds.map(lambda b: b[p * per : (p + 1) * per])
        return iter(ds.to_iter_dataset())

    def check_processes(self) -> None:
        """Refuse, naming the key, what a multi-host run cannot do (``ConfigError``)."""
        procs = jax.process_count()
        if procs == 1:
            return
        cfg, r = self.cfg, self.cfg.rollout
        if r.num_prompts % procs:
            raise ConfigError(f"rollout.num_prompts={r.num_prompts} is not divisible by the "
                              f"{procs} processes (each samples whole groups of an equal "
                              "share of the step's prompts)")
        rows = min(r.batch_size, r.num_prompts * r.num_generations)
        if rows % procs:
            raise ConfigError(f"rollout.batch_size={r.batch_size} ({rows} rows per decode "
                              f"loop) is not divisible by the {procs} processes")
        # An engine says it runs multi-host on itself (``multihost``, not inherited: a
        # subclass may drive its device work per process).
        if not vars(SAMPLERS.get(r.engine)).get("multihost", False):
            raise ConfigError(f"rollout.engine={r.engine} does not run multi-host ({procs} "
                              "processes); use rollout.engine=jax")
        rw = cfg.reward
        uses_rm = "codescaler" in (set(rw.kwargs.get("weights", {})) if rw.name == "mix"
                                   else {rw.name})
        if uses_rm and rw.rm_batch_size % procs:
            raise ConfigError(f"reward.rm_batch_size={rw.rm_batch_size} is not divisible by "
                              f"the {procs} processes")

    def usable_prompts(self, tokenizer) -> tuple[list[Problem], list[list[int]]]:
        """The problems whose rendered prompt fits ``data.max_prompt_length``, and those
        prompts' token ids (``ConfigError`` when fewer than ``rollout.num_prompts`` remain)."""
        cfg = self.cfg
        problems = load_problems(cfg)
        rendered = render_prompts(tokenizer, [p.prompt for p in problems])
        keep = [i for i, ids in enumerate(rendered) if len(ids) <= cfg.data.max_prompt_length]
        if len(keep) < len(rendered):
            log.info("dropped %d of %d prompts longer than data.max_prompt_length=%d",
                     len(rendered) - len(keep), len(rendered), cfg.data.max_prompt_length)
        if len(keep) < cfg.rollout.num_prompts:
            raise ConfigError(f"only {len(keep)} usable prompts, fewer than "
                              f"rollout.num_prompts={cfg.rollout.num_prompts}")
        return [problems[i] for i in keep], [rendered[i] for i in keep]

    def build_programs(self, model: Qwen3ForCausalLM, mesh: Mesh,
                       scfg: SamplingConfig) -> GRPOPrograms:
        """Train state, optimizer and the jitted update, log-prob and advantage programs
        (inside ``set_mesh``)."""
        cfg, a = self.cfg, self.cfg.algorithm
        opts = UpdateOptions(
            loss=a.loss_config(), num_minibatches=a.num_minibatches, micro_batches=a.micro_batches,
            temperature=scfg.logprob_temperature, logprob_chunk=a.logprob_chunk,
        )
        graphdef, params, rest = split_model(model)
        schedule = make_schedule(cfg.optim, cfg.train.steps)
        tx = make_optimizer(cfg.optim, per_update_schedule(schedule, a.num_minibatches))
        shardings = state_shardings(model, tx, mesh)
        # ppo_max_token_len_per_device: the update runs on packed micro-batches (rl.packing)
        packed = a.ppo_max_token_len_per_device is not None
        make_step = make_packed_train_step if packed else make_train_step
        return GRPOPrograms(
            graphdef=graphdef, rest=rest, state=init_state(params, tx, shardings),
            shardings=shardings,
            # A frozen copy of the initial policy, only when the KL term needs it, sharded
            # like the policy. Not checkpointed: rebuilt from policy.init_from / the seed.
            ref_params=(jax.device_put(jax.tree.map(jnp.copy, params), shardings["params"])
                        if a.beta > 0 else None),
            train_step=jax.jit(make_step(graphdef, rest, tx, schedule, opts),
                               out_shardings=(shardings, None), donate_argnums=(0,)),
            logprob_fn=jax.jit(make_logprob_fn(graphdef, rest, opts), static_argnums=(3,)),
            advantages_fn=jax.jit(compute_advantages, static_argnames=(
                "num_generations", "estimator", "scale_rewards", "eps")),
            data_sharding=batch_sharding(mesh),
            scan_layers=model.cfg.scan_layers,
        )

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Train ``train.steps`` steps (from the latest checkpoint when resuming)."""
        self._reward_fn = None
        self._probe: PassRateProbe | None = None
        self.prepare()
        try:
            return self._run()
        finally:
            if self._reward_fn is not None:
                close_reward(self._reward_fn)
            if self._probe is not None:
                self._probe.close()

    def _run(self) -> dict[str, Any]:
        cfg, r, t = self.cfg, self.cfg.rollout, self.cfg.train
        t_start = time.perf_counter()
        self.check_processes()
        assert_shared_directory(self.run_dir)
        mesh = loop.start_run(cfg, self.run_dir, self.mesh if self.mesh is not None
                         else make_mesh(cfg.mesh))
        tokenizer = load_tokenizer(cfg.policy.tokenizer)
        problems, prompts = self.usable_prompts(tokenizer)
        reward_fn = self._reward_fn = build_reward(cfg.reward, mesh)
        model = self.build_policy(mesh, tokenizer)
        scfg = self.sampling_config(tokenizer, model.cfg)
        sampler = SAMPLERS.get(r.engine)(
            model, scfg, mesh=mesh, batch_size=min(r.batch_size, r.num_prompts * r.num_generations),
            max_prompt_len=cfg.data.max_prompt_length, min_prompt_bucket=cfg.data.min_prompt_bucket,
            **r.engine_kwargs,
        )
        # pass-rate probes in the sandbox: a metric of the run, never its reward (rl.metrics)
        self._probe = build_probe(
            cfg.pass_rate_eval, problems, prompts, tokenizer,
            lambda o: decode_responses(tokenizer, o, scfg.eos_token_ids),
            max_prompt_length=cfg.data.max_prompt_length)
        with jax.set_mesh(mesh):
            # Checkpoints in flight are finished and the manager closed on every way out.
            with RunCheckpoints(self.run_dir, keep=t.keep_checkpoints) as ckpt:
                prog = self.build_programs(model, mesh, scfg)
                del model
                it = self.prompt_iterator(len(problems))
                key = jax.random.key(t.seed)
                start, state, meta = loop.resume(
                    ckpt, prog.state, prog.shardings, enabled=self.resume,
                    scan_layers=prog.scan_layers, layout_key="policy.scan_layers")
                history: list[dict[str, float]] = []
                if meta is not None:
                    it.set_state(meta["data_state"])
                    key = jax.random.wrap_key_data(jnp.asarray(meta["rng_key"], jnp.uint32))
                    history = meta.get("history", [])
                self.state, self.graphdef, self.rest = state, prog.graphdef, prog.rest
                if start >= t.steps:
                    loop.nothing_to_train(self.run_dir, start, t.steps, "train.steps")
                    return {"steps": start, "steps_run": 0, "first_step": start,
                            "nothing_to_train": True, "history": history, "last": {},
                            "wall_s": time.perf_counter() - t_start, "config": to_dict(cfg)}
                rollout_step = RolloutStep(cfg, prog, sampler, reward_fn, tokenizer, scfg,
                                           problems, prompts)
                state, out = self._train(ckpt, rollout_step, state, it, key, history, start)
            if t.export_hf:
                loop.export_hf(self.run_dir, prog.graphdef, state["params"], prog.rest,
                          resolve_tokenizer_path(cfg.policy.tokenizer))
        self.state = state
        return loop.write_summary(self.run_dir, {
            **out, "history": history, "wall_s": time.perf_counter() - t_start,
            "usable_prompts": len(problems),
            "pass_rate_eval": self._probe.history if self._probe is not None else None,
            "config": to_dict(cfg),
        })

    def _train(self, ckpt: RunCheckpoints, rollout_step: RolloutStep, state: dict, it: Any,
               key: jax.Array, history: list[dict[str, float]], start: int
               ) -> tuple[dict, dict[str, Any]]:
        """The loop from ``start``: rollout -> reward -> update per step, logging and
        checkpoints. ``(final state, summary entries)``."""
        t = self.cfg.train
        writer = loop.open_writer(self.run_dir, resumed=self.resume, start_step=start)

        def save(step: int) -> None:
            writer.flush()  # events up to `step` are on disk before its checkpoint exists
            ckpt.save(step, state, {"data_state": it.get_state(), "step": step,
                                    "history": history,
                                    "rng_key": np.asarray(jax.random.key_data(key)).tolist()})

        last: dict[str, float] = {}
        times = PhaseTimes()
        probe, sampler = self._probe, rollout_step.sampler
        with closing(writer), loop.progress(t.steps, start, "train_grpo", self.progress) as bar:
            if probe is not None and start == 0:  # the step-0 figure every later one is against
                writer.scalars(0, probe(sampler, state["params"], 0), "eval/")
            for step in range(start, t.steps):
                state, last, rollout, res = rollout_step(state, next(it),
                                                         jax.random.fold_in(key, step))
                done = step + 1
                times.add(last)
                history.append({"step": done, "reward_mean": last["reward/mean"],
                                "valid_code_fraction": last["valid_code_fraction"],
                                "pass_rate": last.get("pass_rate"),
                                "sampler_learner_kl": last.get("rollout/sampler_learner_kl")})
                if probe is not None and probe.due(done, t.steps):
                    writer.scalars(done, probe(sampler, state["params"], done), "eval/")
                if loop.due(t.log_every, done) or done == t.steps:
                    writer.scalars(done, last, "train/")
                if loop.due(t.samples_every, done):
                    self._log_samples(writer, done, rollout, res)
                bar.update(1)
                bar.set_postfix(reward=f"{last['reward/mean']:.3f}",
                                valid=f"{last['valid_code_fraction']:.2f}",
                                len=f"{last['response_length/mean']:.0f}",
                                kl=f"{last['approx_kl']:.1e}")
                if loop.due(t.save_every, done) or done == t.steps:
                    save(done)
            if ckpt.latest_step() is None:
                save(start)
        return state, {"steps": t.steps, "steps_run": times.steps, "first_step": start,
                       "last": last, **times.summary()}

    # ------------------------------------------------------------------ logging
    def _log_samples(self, writer: Writer, step: int, rollout: RolloutBatch,
                     res: RewardResult) -> None:
        for k in range(min(self.cfg.train.num_text_samples, len(rollout))):
            e = res.extractions[k]
            text = (f"**problem** `{rollout.problems[k].problem_id}`\n\n"
                    f"**reward** {res.rewards[k]:.4f} (extraction: {e.reason})\n\n"
                    f"**response**\n\n```\n{rollout.responses[k][:4000]}\n```")
            writer.text(step, f"rollouts/sample_{k}", text)


# ---------------------------------------------------------------------- the loop's parts


@dataclasses.dataclass
class GRPOPrograms:
    """What the loop runs: the fresh train state and its shardings, the reference parameters
    (``beta > 0``), and the jitted update, log-prob and advantage programs."""

    graphdef: Any
    rest: Any
    state: dict
    shardings: dict
    ref_params: Any
    train_step: Any
    logprob_fn: Any
    advantages_fn: Any
    data_sharding: Any
    scan_layers: bool

    def to_global(self, x: np.ndarray) -> jax.Array:
        """This process's rows of a batch -> the global array (one process: the whole
        batch; multi-host: process ``p``'s rows are block ``p``)."""
        if jax.process_count() > 1:
            return rows_to_global(self.data_sharding, x)
        return jax.make_array_from_callback(x.shape, self.data_sharding, lambda i: x[i])


class RolloutStep:
    """One GRPO step: sample ``num_generations`` responses per prompt with the current
    policy, score them, turn rewards into group advantages, recompute the old (and reference)
    log-probs and run the update. ``step(state, prompt indices, key) -> (state, metrics,
    rollout, reward result)``."""

    def __init__(self, cfg: GRPOConfig, prog: GRPOPrograms, sampler: Any, reward_fn: Any,
                 tokenizer: Any, scfg: SamplingConfig, problems: list[Problem],
                 prompts: list[list[int]]):
        self.cfg, self.prog, self.sampler, self.reward_fn = cfg, prog, sampler, reward_fn
        self.tokenizer, self.scfg, self.problems, self.prompts = tokenizer, scfg, problems, prompts
        self.buckets = response_buckets(cfg.rollout.max_new_tokens,
                                        cfg.rollout.min_response_bucket)

    def __call__(self, state: dict, idx: np.ndarray, step_key: jax.Array
                 ) -> tuple[dict, dict[str, float], RolloutBatch, RewardResult]:
        r, a, prog = self.cfg.rollout, self.cfg.algorithm, self.prog
        t0 = time.perf_counter()
        batch_problems = [self.problems[i] for i in idx for _ in range(r.num_generations)]
        batch_prompts = [self.prompts[i] for i in idx for _ in range(r.num_generations)]
        self.sampler.load_params(state["params"])
        out = self.sampler.generate(batch_prompts, step_key)
        t1 = time.perf_counter()
        texts = decode_responses(self.tokenizer, out, self.scfg.eos_token_ids)
        rollout = RolloutBatch(
            batch_problems, texts,
            [list(t[: int(n)]) for t, n in zip(out.tokens, out.lengths, strict=True)],
        )
        res = self.reward_fn(rollout)
        t2 = time.perf_counter()
        multi = jax.process_count() > 1
        # Groups stay on their process; only the batch std needs every process's rewards.
        gather = multi and a.scale_rewards == "batch"
        if gather:
            rewards = jnp.asarray(gather_rows(res.rewards))
        elif res.device_rewards is not None:
            rewards = res.device_rewards  # the co-located RM's: already on the mesh
        else:
            rewards = jnp.asarray(res.rewards)
        adv = prog.advantages_fn(rewards, num_generations=r.num_generations,
                                 estimator=a.estimator, scale_rewards=a.scale_rewards, eps=a.eps)
        if gather:  # this process's block
            n = len(res.rewards)
            adv = np.asarray(adv)[jax.process_index() * n : (jax.process_index() + 1) * n]
        longest = int(global_max(out.lengths.max())) if multi else None
        host = build_update_batch(batch_prompts, out, self.scfg.pad_token_id, self.buckets,
                                  longest)
        n_resp = host["response_mask"].shape[1]
        batch = {k: prog.to_global(v) for k, v in host.items()}
        batch["advantages"] = prog.to_global(np.asarray(adv))
        batch["old_logp"], entropy, drift = old_logprobs(
            a.old_logprobs, prog, state["params"], batch, out, n_resp)
        if prog.ref_params is not None:
            # The same compiled program as the old log-probs (its entropy is unused).
            batch["ref_logp"] = prog.logprob_fn(prog.ref_params, batch["input_ids"],
                                                batch["attention_mask"], n_resp)[0]
        mask = host["response_mask"]
        # The logged figures are the whole step's: multi-host, every process's rows.
        m_res, m_out, m_mask, m_adv = (whole_step(res, out, mask, np.asarray(adv)) if multi
                                       else (res, out, mask, np.asarray(adv)))
        ent = (None if entropy is None
               else float(jnp.sum(entropy * batch["response_mask"])) / max(m_mask.sum(), 1))
        packing = {}
        if a.ppo_max_token_len_per_device is not None:  # the padded rows, packed (rl.packing)
            # multi-host: each process packs its own rows (the stats are the whole step's)
            batch, stats = pack_on_mesh(batch, prog.data_sharding.mesh,
                                        num_minibatches=a.num_minibatches,
                                        token_budget=a.ppo_max_token_len_per_device,
                                        loss=a.loss_config())
            packing = {f"update/{k}": stats[k] for k in (
                "padding_fraction_padded", "padding_fraction_packed", "micro_batches")}
        state, metrics = prog.train_step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t3 = time.perf_counter()
        last = step_metrics(m_res, m_out, m_mask, metrics, ent, m_adv, (t0, t1, t2, t3))
        last.update(drift)
        last.update(packing)
        return state, last, rollout, res


def whole_step(res: RewardResult, out: SampleOutput, mask: np.ndarray, adv: np.ndarray
               ) -> tuple[RewardResult, SampleOutput, np.ndarray, np.ndarray]:
    """Multi-host: every process's rows of what `step_metrics` reads, in process order (a
    collective). The view holds no code and no tokens (``out.tokens`` / ``logprobs`` are
    ``[B, 0]``), and ``mask`` is each process's count of response tokens (`step_metrics` only
    sums it); a reward's own metrics are the mean of the processes' figures (exact for
    fractions of responses: every process holds as many). Whether a reward has scores is the
    same on every process (it depends on the reward, not on the rows)."""
    mine = {"ext": [[e.valid, e.language, e.reason] for e in res.extractions],
            "passed": None if res.passed is None else res.passed.tolist(),
            "metrics": res.metrics}
    every = gather_json(mine)
    ext = [Extraction("", bool(v), lang, why) for p in every for v, lang, why in p["ext"]]
    passed = [x for p in every if p["passed"] is not None for x in p["passed"]]
    keys = dict.fromkeys(k for p in every for k in p["metrics"])
    metrics = {k: float(np.mean([p["metrics"][k] for p in every if k in p["metrics"]]))
               for k in keys}
    scores = None if res.scores is None else gather_rows(res.scores)
    g_res = RewardResult(gather_rows(res.rewards), ext,
                         np.asarray(passed, bool) if passed else None, scores, metrics)
    lengths, stopped = gather_rows(out.lengths), gather_rows(out.stopped)
    empty = np.zeros((len(lengths), 0), out.tokens.dtype)
    g_out = SampleOutput(empty, empty.astype(np.float32), lengths, stopped, out.prompt_len)
    return g_res, g_out, gather_rows(np.asarray([mask.sum()])), gather_rows(adv)


_drift = jax.jit(sampler_learner_drift)


def old_logprobs(mode: str, prog: GRPOPrograms, params: Any, batch: dict, out: SampleOutput,
                 n_resp: int) -> tuple[jax.Array, jax.Array | None, dict[str, float]]:
    """``(old_logp [B, n_resp], entropy or None, drift metrics)`` of one rollout.

    ``recompute``: the actor's log-probs of the sampled tokens with ``params`` (the ones that
    sampled), and how far the sampler's own log-probs are from them
    (``rl.grpo.sampler_learner_drift``). ``sampler``: the sampler's log-probs as they are
    (``algorithm.old_logprobs: sampler``; no recompute pass, so no entropy and no drift)."""
    sampler_logp = prog.to_global(np.ascontiguousarray(out.logprobs[:, :n_resp]))
    if mode == "sampler":
        return sampler_logp, None, {}
    logp, entropy = prog.logprob_fn(params, batch["input_ids"], batch["attention_mask"], n_resp)
    drift = jax.device_get(_drift(sampler_logp, logp, batch["response_mask"]))
    return logp, entropy, {k: float(v) for k, v in drift.items()}


class PhaseTimes:
    """Seconds per phase (rollout, reward, update) summed over steps, and the same without
    this process's first step (compilation)."""

    PHASES = ("rollout", "reward", "update")

    def __init__(self) -> None:
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.steady = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0

    def add(self, metrics: dict[str, float]) -> None:
        for k in self.PHASES:
            self.totals[k] += metrics[f"time/{k}_s"]
            self.steady[k] += metrics[f"time/{k}_s"] if self.steps else 0.0
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        n = self.steps
        return {
            "time_per_phase_s": {k: v / max(n, 1) for k, v in self.totals.items()},
            "time_per_phase_s_after_first_step": (
                {k: v / (n - 1) for k, v in self.steady.items()} if n > 1 else None),
        }
