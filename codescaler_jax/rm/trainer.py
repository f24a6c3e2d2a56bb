"""The RM training loop: data -> jit train step on the mesh -> eval, TensorBoard, checkpoints.

``RMTrainer(cfg).run()`` does everything ``python -m codescaler_jax.train_rm`` does. A run
directory holds ``config.yaml``, ``data/`` (the pairs used, their statistics), ``tb/``
(TensorBoard), ``checkpoints/`` (Orbax), ``hf/`` (the exported Hugging Face RM),
``log.p<process>.txt`` and ``summary.json``. ``resume=True`` restores the latest checkpoint
(parameters, optimizer, step, data-iterator position) and continues exactly; a directory that
already holds a run is refused unless ``resume`` or ``overwrite`` (see
``codescaler_jax.training.run_dir``). The pairs cached in ``data/`` are keyed by the data config
and the identity of the source files, so a changed ``data`` section rebuilds them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from codescaler_jax.config import ConfigError, save_config, to_dict
from codescaler_jax.data.datasets import load_pair_splits
from codescaler_jax.data.pairs import Pair
from codescaler_jax.data.pipeline import (
    drop_identical,
    eval_batches,
    make_buckets,
    pair_batches,
    tokenize_pairs,
)
from codescaler_jax.data.tokenizer import load_tokenizer, resolve_tokenizer_path
from codescaler_jax.distributed import assert_shared_directory
from codescaler_jax.logging_utils import Writer
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
from codescaler_jax.models.sharding import batch_sharding, create_sharded, make_mesh
from codescaler_jax.perf import measure_matmul_peak, train_flops_per_token
from codescaler_jax.rm.config import RMTrainConfig
from codescaler_jax.rm.loss import finalize_metrics
from codescaler_jax.rm.train_step import BATCH_KEYS, StepOptions, make_eval_step, make_train_step
from codescaler_jax.training.checkpoint import check_resume_layout
from codescaler_jax.training.optim import make_optimizer, make_schedule
from codescaler_jax.training.run_dir import RM_RESUME, claim_run_dir, resume_tensorboard
from codescaler_jax.training.state import init_state, split_model, state_shardings

log = logging.getLogger("codescaler_jax")


def model_config(cfg: RMTrainConfig, vocab_min: int, pad_id: int) -> Qwen3Config:
    """Qwen3Config for a from-scratch RM: ``model.size`` with the section's overrides."""
    return cfg.model.sized_config(vocab_min=vocab_min, pad_token_id=pad_id)


def step_options(cfg: RMTrainConfig) -> StepOptions:
    """The train step's static options from the run config."""
    return StepOptions(
        grad_accum_steps=cfg.train.grad_accum_steps,
        margin=cfg.train.margin,
        center_coef=cfg.train.center_rewards_coefficient,
    )


def jit_train_step(graphdef, rest, tx, schedule, opts: StepOptions, shardings: dict):
    """The jitted train step with the state's shardings kept and its buffers donated."""
    return jax.jit(
        make_train_step(graphdef, rest, tx, schedule, opts),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )


class RMTrainer:
    """Builds every piece of an RM run from its config and runs it."""

    def __init__(
        self,
        cfg: RMTrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ):
        """``on_step(step, metrics)`` is called after every optimizer step (and its eval /
        checkpoint), e.g. to stream metrics elsewhere or to stop a run early. ``overwrite``:
        delete a previous run in ``run_dir`` first."""
        self.cfg = cfg
        self.on_step = on_step
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.run_dir = Path(cfg.run_dir)
        self._prepared = False

    def prepare(self) -> None:
        """Check the input paths and the run directory before any work (refuse a used
        directory without ``resume``/``overwrite``, a changed config on resume; with
        ``overwrite`` delete the previous run). Raises ``InputError``. Called by `run`."""
        if self._prepared:
            return
        self.cfg.check_paths()
        claim_run_dir(
            self.run_dir, self.cfg, resume=self.resume, overwrite=self.overwrite, policy=RM_RESUME
        )
        self._prepared = True

    # ------------------------------------------------------------------ data
    def load_pairs(self) -> tuple[list[Pair], list[Pair], list[Pair], dict[str, Any]]:
        """Train, validation and held-out pairs; built once, cached in ``run_dir/data``.

        Multi-host: process 0 builds (or reads) them and writes the cache; the other
        processes then read that cache, so all train on the same pairs and the sandbox runs
        once."""
        if jax.process_count() == 1:
            return self._load_pairs()
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            out = self._load_pairs()
        multihost_utils.sync_global_devices("codescaler_jax.rm.pairs_cached")
        if jax.process_index() != 0:
            out = self._load_pairs()
        return out

    def _load_pairs(self) -> tuple[list[Pair], list[Pair], list[Pair], dict[str, Any]]:
        return load_pair_splits(
            self.cfg.data, seed=self.cfg.train.seed, data_dir=self.run_dir / "data",
            resume=self.resume, progress=self.progress, write=jax.process_index() == 0,
        )

    # ------------------------------------------------------------------ model
    def build_model(self, mesh, tokenizer) -> Qwen3RewardModel:
        m = self.cfg.model
        if m.init_from:
            from codescaler_jax.models.hf_io import load_hf_model

            return load_hf_model(m.init_from, Qwen3RewardModel, mesh=mesh, **m.compute_overrides())
        mcfg = model_config(self.cfg, len(tokenizer), tokenizer.pad_token_id)
        seed = self.cfg.train.seed
        return create_sharded(lambda: Qwen3RewardModel(mcfg, rngs=nnx.Rngs(seed)), mesh)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = time.perf_counter()
        self.prepare()
        assert_shared_directory(self.run_dir)
        if jax.process_index() == 0:
            save_config(cfg, self.run_dir / "config.yaml")
        mesh = make_mesh(cfg.mesh)
        log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        train_pairs, val_pairs, held_pairs, data_stats = self.load_pairs()
        max_len = cfg.data.max_length
        buckets = make_buckets(
            max_len, min(cfg.data.min_bucket, max_len), cfg.data.buckets_per_octave
        )
        train_tok = tokenize_pairs(train_pairs, tokenizer, max_len, progress=self.progress)
        val_tok = tokenize_pairs(val_pairs, tokenizer, max_len, progress=self.progress)
        held_tok = tokenize_pairs(held_pairs, tokenizer, max_len, progress=self.progress)
        # Pairs whose two inputs are identical after truncation carry no preference: dropped
        # from training and evaluation, and counted.
        identical = {"max_length": max_len}
        train_pairs, train_tok, identical["train"] = drop_identical(train_pairs, train_tok)
        val_pairs, val_tok, identical["validation"] = drop_identical(val_pairs, val_tok)
        held_pairs, held_tok, identical["eval"] = drop_identical(held_pairs, held_tok)
        if not val_pairs and not identical["validation"]:
            del identical["validation"]
        data_stats = {
            **data_stats,
            "identical_after_truncation": identical,
            "train_pairs_used": len(train_pairs),
            "validation_pairs_used": len(val_pairs),
            "eval_pairs_used": len(held_pairs),
        }
        if len(train_pairs) < cfg.train.global_batch_size:
            raise ConfigError(
                f"only {len(train_pairs)} training pairs, fewer than "
                f"train.global_batch_size={cfg.train.global_batch_size}"
            )
        # evaluation in length order: less padding, the same metrics
        val_pairs, val_tok = _by_length(val_pairs, val_tok)
        held_pairs, held_tok = _by_length(held_pairs, held_tok)
        if identical["train"] or identical["eval"] or identical.get("validation"):
            log.info(
                "dropped pairs identical after truncation at %d tokens: %s", max_len, identical
            )
        pad_id = tokenizer.pad_token_id
        train_ds = pair_batches(
            train_tok,
            global_batch_size=cfg.train.global_batch_size,
            buckets=buckets,
            pad_id=pad_id,
            seed=cfg.train.seed,
            num_epochs=cfg.train.num_epochs,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            group_by_length=cfg.data.group_by_length,
        )
        total_steps = len(train_ds)
        if cfg.train.max_steps is not None:
            total_steps = min(total_steps, cfg.train.max_steps)

        # Built outside `set_mesh`: parameters carry logical axis names, which the active-mesh
        # path of nnx would try to read as mesh axes.
        model = self.build_model(mesh, tokenizer)
        with jax.set_mesh(mesh):
            mc = model.cfg
            model_cfg = dict(
                hidden=mc.hidden_size,
                intermediate=mc.intermediate_size,
                layers=mc.num_hidden_layers,
                heads=mc.num_attention_heads,
                kv_heads=mc.num_key_value_heads,
                head_dim=mc.head_dim,
            )
            graphdef, params, rest = split_model(model)
            schedule = make_schedule(cfg.optim, total_steps)
            tx = make_optimizer(cfg.optim, schedule)
            shardings = state_shardings(model, tx, mesh)
            del model
            state = init_state(params, tx, shardings)
            opts = step_options(cfg)
            train_step = jit_train_step(graphdef, rest, tx, schedule, opts, shardings)
            # Replicated outputs: every process can read them (multi-host too).
            eval_step = jax.jit(
                make_eval_step(graphdef, rest, opts),
                out_shardings=NamedSharding(mesh, PartitionSpec()),
            )
            data_sharding = batch_sharding(mesh)

            def to_global(
                batch: dict[str, np.ndarray], keys, whole: bool = False
            ) -> dict[str, jax.Array]:
                # whole=True: every process holds the whole global batch (eval) and keeps
                # only its devices' rows; else each holds its own rows (pair_batches).
                return {
                    k: jax.make_array_from_process_local_data(
                        data_sharding, batch[k], batch[k].shape if whole else None
                    )
                    for k in keys
                }

            def evaluate(params, data=None, pairs=None) -> dict[str, float]:
                """Pairwise metrics on ``data`` (default: held-out), with
                ``by_kind/<kind>/accuracy`` (how the rejected code was made) and
                ``by_positive/<kind>/accuracy`` (canonical or rewrite) where pairs know it."""
                data = held_tok if data is None else data
                pairs = held_pairs if pairs is None else pairs
                if not len(data):
                    return {}
                sums: dict[str, float] = {}
                correct: list[float] = []
                for b in eval_batches(
                    data, batch_size=cfg.train.eval_batch_size, buckets=buckets, pad_id=pad_id
                ):
                    out = jax.device_get(
                        eval_step(params, to_global(b, (*BATCH_KEYS, "weight"), whole=True))
                    )
                    correct.extend(np.asarray(out.pop("pair_correct"))[b["weight"] > 0].tolist())
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                metrics = finalize_metrics(sums)
                for prefix, labels in (
                    ("by_kind", [p.kind or "unknown" for p in pairs]),
                    ("by_positive", [p.chosen_kind or "unknown" for p in pairs]),
                ):
                    kinds = sorted(set(labels))
                    if len(kinds) > 1:
                        for kind in kinds:
                            sel = [c for c, k in zip(correct, labels) if k == kind]
                            metrics[f"{prefix}/{kind}/accuracy"] = float(np.mean(sel))
                            metrics[f"{prefix}/{kind}/pairs"] = float(len(sel))
                return metrics

            ckpt = ocp.CheckpointManager(
                (self.run_dir / "checkpoints").absolute(),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=cfg.train.keep_checkpoints, create=True
                ),
            )
            it = iter(train_ds.to_iter_dataset())
            start_step = 0
            history: dict[str, Any] = {"eval": []}
            if self.resume and ckpt.latest_step() is not None:
                step0 = ckpt.latest_step()
                check_resume_layout(ckpt.directory, step0, mc.scan_layers, "model.scan_layers")
                abstract = jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                    state,
                    shardings,
                )
                restored = ckpt.restore(
                    step0,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
                state = restored["state"]
                meta = restored["meta"]
                it.set_state(meta["data_state"])
                history = meta.get("history", history)
                start_step = int(step0)
                log.info("resumed from step %d", start_step)
            elif self.resume:
                log.info("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
            if start_step >= total_steps:
                ckpt.close()
                self.state, self.graphdef, self.rest = state, graphdef, rest
                return self._nothing_to_train(
                    start_step, total_steps, history, data_stats, t_start
                )

            if self.resume:
                resume_tensorboard(self.run_dir / "tb", start_step)
            writer = self.writer = Writer(self.run_dir / "tb")  # on_step hooks may log or flush
            peak = measure_matmul_peak(
                jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32, n=1024, repeat=3
            )
            if start_step == 0:
                m0 = evaluate(state["params"])
                if m0:
                    history["eval"].append({"step": 0, **m0})
                    writer.scalars(0, m0, "eval/")
                    log.info("step 0 (untrained) held-out: %s", _fmt(m0))

            def save(step: int) -> None:
                # Every event up to `step` is on disk before its checkpoint exists: a run killed
                # later resumes from here with no step missing in TensorBoard.
                writer.flush()
                meta = {"data_state": it.get_state(), "step": step, "history": history}
                ckpt.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                    ),
                )

            # Whatever happens (a crash, Ctrl-C), checkpoints in flight are finished and the
            # TensorBoard file is flushed, so nothing already written is lost.
            try:
                bar = tqdm(
                    total=total_steps,
                    initial=start_step,
                    desc="train_rm",
                    unit="step",
                    disable=not self.progress or jax.process_index() != 0,
                )
                last: dict[str, float] = {}
                history.setdefault("validation", [])
                # best validation so far; after a resume it restarts (its parameters are not
                # checkpointed)
                best: dict[str, Any] = {"step": None, "accuracy": -1.0, "since": 0}
                stopped_early = False
                end_step = start_step
                for step in range(start_step, total_steps):
                    t0 = time.perf_counter()
                    batch = next(it)
                    t1 = time.perf_counter()
                    state, metrics = train_step(state, to_global(batch, BATCH_KEYS))
                    metrics = jax.device_get(metrics)
                    t2 = time.perf_counter()
                    length = batch["chosen_ids"].shape[1]
                    n_pairs = cfg.train.global_batch_size
                    tokens = 2 * n_pairs * length
                    real = float(batch["chosen_mask"].sum() + batch["rejected_mask"].sum())
                    real *= jax.process_count()
                    flops = tokens * train_flops_per_token(seq_len=length, **model_cfg)
                    stats = finalize_metrics(metrics)
                    last = {
                        **stats,
                        "grad_norm": float(metrics["grad_norm"]),
                        "learning_rate": float(metrics["learning_rate"]),
                        "tokens_per_s": tokens / (t2 - t1),
                        "real_tokens_per_s": real / (t2 - t1),
                        "mfu": flops / (t2 - t1) / peak,
                        "time/step_s": t2 - t1,
                        "time/data_s": t1 - t0,
                        "seq_len": length,
                    }
                    done = step + 1
                    if done % cfg.train.log_every == 0 or done == total_steps:
                        writer.scalars(done, last, "train/")
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{stats['loss']:.4f}",
                        acc=f"{stats['accuracy']:.2f}",
                        lr=f"{last['learning_rate']:.2e}",
                        tok_s=f"{last['tokens_per_s']:.0f}",
                    )
                    if (
                        cfg.train.eval_every
                        and done % cfg.train.eval_every == 0
                        and done < total_steps
                    ):
                        t3 = time.perf_counter()
                        if len(val_tok):
                            # model selection and early stopping look at validation only
                            m = evaluate(state["params"], val_tok, val_pairs)
                            writer.scalars(
                                done, {**m, "time_s": time.perf_counter() - t3}, "validation/"
                            )
                            history["validation"].append({"step": done, **m})
                            log.info("step %d validation: %s", done, _fmt(m))
                            if m["accuracy"] > best["accuracy"]:
                                best.update(step=done, accuracy=m["accuracy"], since=0)
                                if cfg.train.select_best:
                                    best["params"] = jax.tree.map(jnp.copy, state["params"])
                            else:
                                best["since"] += 1
                            patience = cfg.train.early_stopping_patience
                            if patience is not None and best["since"] >= patience:
                                log.info(
                                    "early stop at step %d: no better validation accuracy in "
                                    "%d evaluations (best %.4f at step %d)",
                                    done,
                                    patience,
                                    best["accuracy"],
                                    best["step"],
                                )
                                stopped_early = True
                        else:
                            m = evaluate(state["params"])
                            writer.scalars(done, {**m, "time_s": time.perf_counter() - t3}, "eval/")
                            history["eval"].append({"step": done, **m})
                            log.info("step %d held-out: %s", done, _fmt(m))
                    if (
                        cfg.train.save_every
                        and done % cfg.train.save_every == 0
                        and done < total_steps
                    ):
                        t3 = time.perf_counter()
                        save(done)
                        writer.scalars(
                            done, {"time/checkpoint_s": time.perf_counter() - t3}, "train/"
                        )
                    if self.on_step is not None:
                        self.on_step(done, last)
                    end_step = done
                    if stopped_early:
                        break
                if len(val_tok):
                    m = evaluate(state["params"], val_tok, val_pairs)
                    history["validation"].append({"step": end_step, **m})
                    writer.scalars(end_step, m, "validation/")
                    log.info("step %d validation: %s", end_step, _fmt(m))
                    if m["accuracy"] > best["accuracy"]:
                        best.update(step=end_step, accuracy=m["accuracy"], params=None)
                    if cfg.train.select_best and best.get("params") is not None:
                        log.info(
                            "keeping the best-validation parameters (step %d, accuracy %.4f)",
                            best["step"],
                            best["accuracy"],
                        )
                        state = {**state, "params": best["params"]}
                final = evaluate(state["params"])
                if final:
                    writer.scalars(end_step, final, "eval/")
                    if not history["eval"] or history["eval"][-1]["step"] != end_step:
                        history["eval"].append({"step": end_step, **final})
                    log.info("final held-out: %s", _fmt(final))
                if start_step < end_step or ckpt.latest_step() is None:
                    save(end_step)
            finally:
                bar.close()
                ckpt.wait_until_finished()
                ckpt.close()
                writer.close()
            if cfg.train.export_hf:
                from codescaler_jax.models.hf_io import save_hf_model

                final_model = nnx.merge(graphdef, state["params"], rest)
                save_hf_model(
                    final_model,
                    self.run_dir / "hf",
                    tokenizer_dir=resolve_tokenizer_path(cfg.data.tokenizer),
                )
            self.state, self.graphdef, self.rest = state, graphdef, rest
        summary = {
            "steps": end_step,
            "planned_steps": total_steps,
            "stopped_early": stopped_early,
            "first_step": start_step,
            "steps_run": end_step - start_step,
            "data": data_stats,
            "untrained_eval": next((e for e in history["eval"] if e["step"] == 0), None),
            "validation": history.get("validation", []),
            "best_validation": {"step": best["step"], "accuracy": best["accuracy"]}
            if best["step"] is not None
            else None,
            "final_eval": final or None,
            "last_train": last,
            "wall_s": time.perf_counter() - t_start,
            "matmul_peak_flops": peak,
            "config": to_dict(cfg),
        }
        if jax.process_index() == 0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _nothing_to_train(
        self, step: int, total: int, history: dict[str, Any], data_stats: dict[str, Any],
        t_start: float,
    ) -> dict[str, Any]:
        """A resume whose checkpoint already reached the step budget: train nothing, keep
        ``hf/``, ``summary.json`` and TensorBoard as they are, and say so."""
        log.warning(
            "nothing to train: the checkpoint in %s is at step %d and the step budget is %d "
            "(train.max_steps, or the data's epochs); raise train.max_steps to continue. "
            "hf/, summary.json and tb/ are left as they were",
            self.run_dir / "checkpoints", step, total,
        )
        hf = self.run_dir / "hf"
        if self.cfg.train.export_hf and not (hf / "config.json").is_file():
            from codescaler_jax.models.hf_io import save_hf_model

            save_hf_model(
                nnx.merge(self.graphdef, self.state["params"], self.rest), hf,
                tokenizer_dir=resolve_tokenizer_path(self.cfg.data.tokenizer),
            )
            log.info("hf/ was missing: exported the step-%d weights of the checkpoint", step)
        evals = [e for e in history.get("eval", []) if e["step"] == step]
        return {
            "steps": step,
            "first_step": step,
            "steps_run": 0,
            "nothing_to_train": True,
            "data": data_stats,
            "untrained_eval": next((e for e in history.get("eval", []) if e["step"] == 0), None),
            # The held-out metrics recorded when the run reached this step (not re-measured).
            "checkpoint_eval": evals[-1] if evals else None,
            "final_eval": None,
            "wall_s": time.perf_counter() - t_start,
            "config": to_dict(self.cfg),
        }


def _by_length(pairs: list[Pair], tok) -> tuple[list[Pair], Any]:
    order = np.argsort(tok.lengths(), kind="stable") if len(tok) else []
    return [pairs[i] for i in order], type(tok)(
        [tok.chosen[i] for i in order], [tok.rejected[i] for i in order]
    )


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in m.items())
