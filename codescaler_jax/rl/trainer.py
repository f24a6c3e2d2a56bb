"""The GRPO loop: rollout -> reward -> advantages -> update, with logging and checkpoints.

``GRPOTrainer(cfg).run()`` does everything ``python -m codescaler_jax.train_grpo`` does. Per
step: take ``num_prompts`` problems from the prompt iterator, sample ``num_generations``
responses for each (``JaxSampler``, current policy), score them (the registered reward), turn
rewards into group advantages, recompute the actor's log-probs (and the reference's when
``beta > 0``), and run the jitted train step (``num_minibatches`` optimizer updates).

A run directory holds ``config.yaml``, ``tb/`` (TensorBoard: reward mean/std, valid-code
fraction, pass rate, response length, clip fraction, approx KL, entropy, grad norm, learning
rate, time per phase, tokens/s; rollout text samples), ``checkpoints/`` (Orbax: train state,
prompt-iterator state, RNG key), ``hf/`` (the policy in Hugging Face format),
``log.p<process>.txt`` and ``summary.json``. ``resume=True`` continues exactly from the latest
checkpoint: the RNG of step ``s`` is ``fold_in(key, s)``, so a resumed run draws the same
samples as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from codescaler_jax.config import ConfigError, save_config, to_dict
from codescaler_jax.data.problems import Problem, humaneval_problems, read_problems_jsonl
from codescaler_jax.data.tokenizer import load_tokenizer, resolve_tokenizer_path
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
)
from codescaler_jax.rl.rewards import RewardResult, RolloutBatch, build_reward, close_reward
from codescaler_jax.training.checkpoint import check_resume_layout
from codescaler_jax.training.optim import make_optimizer, make_schedule
from codescaler_jax.training.run_dir import GRPO_RESUME, claim_run_dir, resume_tensorboard
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
    prompts: list[list[int]], out: SampleOutput, pad_id: int, buckets: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Host arrays of one update: ``input_ids``/``attention_mask`` ``[B, P + N]`` (left-padded
    prompt then right-padded response), ``response_mask [B, N]``; N is the bucket of the longest
    response."""
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
        """Endless shuffled batches of problem indices (reshuffled every epoch), checkpointable."""
        r = self.cfg.rollout
        ds = grain.MapDataset.range(n).shuffle(seed=self.cfg.train.seed).repeat(None)
        ds = ds.batch(r.num_prompts, drop_remainder=True, batch_fn=np.asarray)
        return iter(ds.to_iter_dataset())

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Train ``train.steps`` steps (from the latest checkpoint when resuming)."""
        self._reward_fn = None
        self.prepare()
        try:
            return self._run()
        finally:
            if self._reward_fn is not None:
                close_reward(self._reward_fn)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        r, a = cfg.rollout, cfg.algorithm
        t_start = time.perf_counter()
        if jax.process_index() == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        mesh = self.mesh if self.mesh is not None else make_mesh(cfg.mesh)
        log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())
        tokenizer = load_tokenizer(cfg.policy.tokenizer)
        problems_all = load_problems(cfg)
        rendered = render_prompts(tokenizer, [p.prompt for p in problems_all])
        keep = [i for i, ids in enumerate(rendered) if len(ids) <= cfg.data.max_prompt_length]
        if len(keep) < len(rendered):
            log.info("dropped %d of %d prompts longer than data.max_prompt_length=%d",
                     len(rendered) - len(keep), len(rendered), cfg.data.max_prompt_length)
        problems = [problems_all[i] for i in keep]
        prompts = [rendered[i] for i in keep]
        if len(problems) < r.num_prompts:
            raise ConfigError(f"only {len(problems)} usable prompts, fewer than "
                             f"rollout.num_prompts={r.num_prompts}")
        reward_fn = self._reward_fn = build_reward(cfg.reward, mesh)

        model = self.build_policy(mesh, tokenizer)
        mcfg = model.cfg
        scfg = self.sampling_config(tokenizer, mcfg)
        sampler = SAMPLERS.get(r.engine)(
            model, scfg, mesh=mesh, batch_size=min(r.batch_size, r.num_prompts * r.num_generations),
            max_prompt_len=cfg.data.max_prompt_length, min_prompt_bucket=cfg.data.min_prompt_bucket,
        )
        r_buckets = response_buckets(r.max_new_tokens, r.min_response_bucket)
        pad_id = scfg.pad_token_id
        opts = UpdateOptions(
            loss=a.loss_config(), num_minibatches=a.num_minibatches, micro_batches=a.micro_batches,
            temperature=scfg.logprob_temperature, logprob_chunk=a.logprob_chunk,
        )
        with jax.set_mesh(mesh):
            graphdef, params, rest = split_model(model)
            schedule = make_schedule(cfg.optim, cfg.train.steps)
            tx = make_optimizer(cfg.optim, per_update_schedule(schedule, a.num_minibatches))
            shardings = state_shardings(model, tx, mesh)
            del model
            state = init_state(params, tx, shardings)
            # A frozen copy of the initial policy, only when the KL term needs it. Not
            # checkpointed: it is rebuilt from policy.init_from / the seed on resume.
            ref_params = jax.tree.map(jnp.copy, params) if a.beta > 0 else None
            train_step = jax.jit(
                make_train_step(graphdef, rest, tx, schedule, opts),
                out_shardings=(shardings, None), donate_argnums=(0,),
            )
            logprob_fn = jax.jit(make_logprob_fn(graphdef, rest, opts), static_argnums=(3,))
            advantages_fn = jax.jit(
                compute_advantages, static_argnames=("num_generations", "estimator",
                                                     "scale_rewards", "eps"),
            )
            data_sharding = batch_sharding(mesh)

            def to_global(x: np.ndarray) -> jax.Array:
                # Every process holds the whole batch (the host work is replicated).
                return jax.make_array_from_callback(x.shape, data_sharding, lambda i: x[i])

            ckpt = ocp.CheckpointManager(
                (self.run_dir / "checkpoints").absolute(),
                options=ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints,
                                                     create=True),
            )
            it = self.prompt_iterator(len(problems))
            key = jax.random.key(cfg.train.seed)
            start_step = 0
            history: list[dict[str, float]] = []
            if self.resume and ckpt.latest_step() is not None:
                step0 = ckpt.latest_step()
                check_resume_layout(ckpt.directory, step0, mcfg.scan_layers, "policy.scan_layers")
                sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
                abstract = jax.tree.map(sds, state, shardings)
                restored = ckpt.restore(step0, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
                state = restored["state"]
                meta = restored["meta"]
                it.set_state(meta["data_state"])
                key = jax.random.wrap_key_data(jnp.asarray(meta["rng_key"], jnp.uint32))
                history = meta.get("history", [])
                start_step = int(step0)
                log.info("resumed from step %d", start_step)
            elif self.resume:
                log.info("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
            if start_step >= cfg.train.steps:
                log.warning(
                    "nothing to train: the checkpoint in %s is at step %d and train.steps is "
                    "%d; raise train.steps to continue. hf/, summary.json and tb/ are left as "
                    "they were", self.run_dir / "checkpoints", start_step, cfg.train.steps)
                ckpt.close()
                self.state, self.graphdef, self.rest = state, graphdef, rest
                return {"steps": start_step, "steps_run": 0, "first_step": start_step,
                        "nothing_to_train": True, "history": history, "last": {},
                        "wall_s": time.perf_counter() - t_start, "config": to_dict(cfg)}

            def save(step: int) -> None:
                writer.flush()  # events up to `step` are on disk before its checkpoint exists
                meta = {"data_state": it.get_state(), "step": step, "history": history,
                        "rng_key": np.asarray(jax.random.key_data(key)).tolist()}
                ckpt.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

            if self.resume:
                resume_tensorboard(self.run_dir / "tb", start_step)
            writer = Writer(self.run_dir / "tb")
            bar = tqdm(total=cfg.train.steps, initial=start_step, desc="train_grpo", unit="step",
                       disable=not self.progress or jax.process_index() != 0)
            last: dict[str, float] = {}
            totals = {"rollout": 0.0, "reward": 0.0, "update": 0.0}
            steady = dict(totals)  # the same without this process's first step (compilation)
            steps_run = 0
            for step in range(start_step, cfg.train.steps):
                t0 = time.perf_counter()
                idx = next(it)
                batch_problems = [problems[i] for i in idx for _ in range(r.num_generations)]
                batch_prompts = [prompts[i] for i in idx for _ in range(r.num_generations)]
                step_key = jax.random.fold_in(key, step)
                sampler.load_params(state["params"])
                out = sampler.generate(batch_prompts, step_key)
                t1 = time.perf_counter()
                texts = decode_responses(tokenizer, out, scfg.eos_token_ids)
                rollout = RolloutBatch(
                    batch_problems, texts,
                    [list(t[: int(n)]) for t, n in zip(out.tokens, out.lengths, strict=True)],
                )
                res = reward_fn(rollout)
                t2 = time.perf_counter()
                adv = advantages_fn(jnp.asarray(res.rewards), num_generations=r.num_generations,
                                    estimator=a.estimator, scale_rewards=a.scale_rewards,
                                    eps=a.eps)
                host = build_update_batch(batch_prompts, out, pad_id, r_buckets)
                n_resp = host["response_mask"].shape[1]
                batch = {k: to_global(v) for k, v in host.items()}
                batch["advantages"] = to_global(np.asarray(adv))
                old_logp, entropy = logprob_fn(state["params"], batch["input_ids"],
                                               batch["attention_mask"], n_resp)
                batch["old_logp"] = old_logp
                if ref_params is not None:
                    # The same compiled program as the old log-probs (its entropy is unused).
                    batch["ref_logp"] = logprob_fn(ref_params, batch["input_ids"],
                                                   batch["attention_mask"], n_resp)[0]
                mask = host["response_mask"]
                ent = float(jnp.sum(entropy * batch["response_mask"])) / max(mask.sum(), 1)
                state, metrics = train_step(state, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                t3 = time.perf_counter()
                done = step + 1
                last = self._step_metrics(res, out, mask, metrics, ent, np.asarray(adv),
                                          (t0, t1, t2, t3))
                for k in totals:
                    totals[k] += last[f"time/{k}_s"]
                    steady[k] += last[f"time/{k}_s"] if steps_run else 0.0
                steps_run += 1
                history.append({"step": done, "reward_mean": last["reward/mean"],
                                "valid_code_fraction": last["valid_code_fraction"]})
                if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                    writer.scalars(done, last, "train/")
                if cfg.train.samples_every and done % cfg.train.samples_every == 0:
                    self._log_samples(writer, done, rollout, res)
                bar.update(1)
                bar.set_postfix(reward=f"{last['reward/mean']:.3f}",
                                valid=f"{last['valid_code_fraction']:.2f}",
                                len=f"{last['response_length/mean']:.0f}",
                                kl=f"{last['approx_kl']:.1e}")
                if (cfg.train.save_every and done % cfg.train.save_every == 0
                        or done == cfg.train.steps):
                    save(done)
            bar.close()
            if ckpt.latest_step() is None:
                save(start_step)
            ckpt.wait_until_finished()
            writer.close()
            if cfg.train.export_hf:
                from codescaler_jax.models.hf_io import save_hf_model

                save_hf_model(nnx.merge(graphdef, state["params"], rest), self.run_dir / "hf",
                              tokenizer_dir=resolve_tokenizer_path(cfg.policy.tokenizer))
            self.state, self.graphdef, self.rest = state, graphdef, rest
        summary = {
            "steps": cfg.train.steps,
            "steps_run": steps_run,
            "first_step": start_step,
            "history": history,
            "last": last,
            "time_per_phase_s": {k: v / max(steps_run, 1) for k, v in totals.items()},
            "time_per_phase_s_after_first_step": (
                {k: v / (steps_run - 1) for k, v in steady.items()} if steps_run > 1 else None),
            "wall_s": time.perf_counter() - t_start,
            "usable_prompts": len(problems),
            "config": to_dict(cfg),
        }
        if jax.process_index() == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ------------------------------------------------------------------ logging
    @staticmethod
    def _step_metrics(res: RewardResult, out: SampleOutput, mask: np.ndarray,
                      update: dict[str, float], entropy: float, adv: np.ndarray,
                      times: tuple[float, float, float, float]) -> dict[str, float]:
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
            "entropy": entropy,
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
        if res.passed is not None:
            m["pass_rate"] = float(res.passed.mean())
        return m

    def _log_samples(self, writer: Writer, step: int, rollout: RolloutBatch,
                     res: RewardResult) -> None:
        for k in range(min(self.cfg.train.num_text_samples, len(rollout))):
            e = res.extractions[k]
            text = (f"**problem** `{rollout.problems[k].problem_id}`\n\n"
                    f"**reward** {res.rewards[k]:.4f} (extraction: {e.reason})\n\n"
                    f"**response**\n\n```\n{rollout.responses[k][:4000]}\n```")
            writer.text(step, f"rollouts/sample_{k}", text)

