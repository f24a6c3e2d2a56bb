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

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from codescaler_jax.config import ConfigError, to_dict
from codescaler_jax.data.datasets import load_pair_splits
from codescaler_jax.data.debias import length_debias_pairs
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
from codescaler_jax.training.checkpoint import RunCheckpoints
from codescaler_jax.training.loop import (
    due,
    export_hf,
    nothing_to_train,
    open_writer,
    progress,
    resume,
    start_run,
    write_summary,
)
from codescaler_jax.training.optim import make_optimizer, make_schedule
from codescaler_jax.training.run_dir import RM_RESUME, claim_run_dir
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
        self._ema = None

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

    def prepare_data(self, tokenizer) -> PairData:
        """The run's pairs, tokenized: identical-after-truncation pairs dropped (counted),
        evaluation splits in length order, the training batches built."""
        cfg = self.cfg
        train_pairs, val_pairs, held_pairs, stats = self.load_pairs()
        max_len = cfg.data.max_length
        if cfg.data.train_length_debias != "none":
            # training pairs only: validation and held-out pairs stay as built
            train_pairs, stats["train_length_debias"] = length_debias_pairs(
                train_pairs, tokenizer, max_len, seed=cfg.train.seed,
                mode=cfg.data.train_length_debias, margin=cfg.data.train_length_debias_margin,
            )
            log.info("length-debiased training pairs: %s", stats["train_length_debias"])
        if cfg.data.corpus_functions:
            # training pairs only, never cached with the verified ones (no sandbox involved)
            from codescaler_jax.data.corpus import corpus_pairs
            from codescaler_jax.data.mutants import FINE_MUTANT_KINDS

            extra, stats["corpus"] = corpus_pairs(
                n_functions=cfg.data.corpus_functions,
                mutants_per_function=cfg.data.corpus_mutants_per_function,
                kinds=tuple(cfg.data.corpus_mutant_kinds or FINE_MUTANT_KINDS),
                seed=cfg.train.seed,
            )
            train_pairs = train_pairs + extra
        buckets = make_buckets(
            max_len, min(cfg.data.min_bucket, max_len), cfg.data.buckets_per_octave
        )
        tok = [tokenize_pairs(p, tokenizer, max_len, progress=self.progress)
               for p in (train_pairs, val_pairs, held_pairs)]
        # Pairs whose two inputs are identical after truncation carry no preference: dropped
        # from training and evaluation, and counted.
        identical: dict[str, Any] = {"max_length": max_len}
        train_pairs, train_tok, identical["train"] = drop_identical(train_pairs, tok[0])
        val_pairs, val_tok, identical["validation"] = drop_identical(val_pairs, tok[1])
        held_pairs, held_tok, identical["eval"] = drop_identical(held_pairs, tok[2])
        if not val_pairs and not identical["validation"]:
            del identical["validation"]
        stats = {
            **stats,
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
        if identical["train"] or identical["eval"] or identical.get("validation"):
            log.info(
                "dropped pairs identical after truncation at %d tokens: %s", max_len, identical
            )
        train_ds = pair_batches(
            train_tok,
            global_batch_size=cfg.train.global_batch_size,
            buckets=buckets,
            pad_id=tokenizer.pad_token_id,
            seed=cfg.train.seed,
            num_epochs=cfg.train.num_epochs,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            group_by_length=cfg.data.group_by_length,
        )
        total = len(train_ds)
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        # evaluation in length order: less padding, the same metrics
        return PairData(
            validation=_by_length(val_pairs, val_tok), held_out=_by_length(held_pairs, held_tok),
            buckets=buckets, pad_id=tokenizer.pad_token_id, stats=stats,
            batches=iter(train_ds.to_iter_dataset()), total_steps=total,
        )

    def build_programs(self, model: Qwen3RewardModel, mesh, data: PairData) -> RMPrograms:
        """Train state, optimizer and the jitted train / eval steps (inside ``set_mesh``)."""
        cfg = self.cfg
        mc = model.cfg
        graphdef, params, rest = split_model(model)
        schedule = make_schedule(cfg.optim, data.total_steps)
        tx = make_optimizer(cfg.optim, schedule)
        shardings = state_shardings(model, tx, mesh)
        opts = step_options(cfg)
        # Replicated eval outputs: every process can read them (multi-host too).
        eval_step = jax.jit(make_eval_step(graphdef, rest, opts),
                            out_shardings=NamedSharding(mesh, PartitionSpec()))
        dims = dict(hidden=mc.hidden_size, intermediate=mc.intermediate_size,
                    layers=mc.num_hidden_layers, heads=mc.num_attention_heads,
                    kv_heads=mc.num_key_value_heads, head_dim=mc.head_dim)
        return RMPrograms(
            graphdef=graphdef, rest=rest, state=init_state(params, tx, shardings),
            shardings=shardings,
            train_step=jit_train_step(graphdef, rest, tx, schedule, opts, shardings),
            evaluator=PairEvaluator(eval_step, batch_sharding(mesh), data,
                                    cfg.train.eval_batch_size),
            scan_layers=mc.scan_layers,
            flops_per_token=lambda length: train_flops_per_token(seq_len=length, **dims),
        )

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        """Train, evaluate, checkpoint and export; returns (and writes) the run summary."""
        cfg, t = self.cfg, self.cfg.train
        t_start = time.perf_counter()
        self.prepare()
        assert_shared_directory(self.run_dir)
        mesh = start_run(cfg, self.run_dir, make_mesh(cfg.mesh))
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        data = self.prepare_data(tokenizer)
        # Built outside `set_mesh`: parameters carry logical axis names, which the active-mesh
        # path of nnx would try to read as mesh axes.
        model = self.build_model(mesh, tokenizer)
        with jax.set_mesh(mesh):
            # Whatever happens (a crash, Ctrl-C), checkpoints in flight are finished and the
            # manager closed on the way out.
            with RunCheckpoints(self.run_dir, keep=t.keep_checkpoints) as ckpt:
                prog = self.build_programs(model, mesh, data)
                del model
                start, state, meta = resume(ckpt, prog.state, prog.shardings, enabled=self.resume,
                                            scan_layers=prog.scan_layers,
                                            layout_key="model.scan_layers")
                history: dict[str, Any] = {"eval": []}
                if meta is not None:
                    data.batches.set_state(meta["data_state"])
                    history = meta.get("history", history)
                self.state, self.graphdef, self.rest = state, prog.graphdef, prog.rest
                if start >= data.total_steps:
                    return self._nothing_to_train(start, data.total_steps, history, data.stats,
                                                  t_start)
                state, out = self._train(ckpt, prog, data, state, history, start)
            if t.export_hf:
                export_hf(self.run_dir, prog.graphdef, state["params"], prog.rest,
                          resolve_tokenizer_path(cfg.data.tokenizer))
        self.state = state
        return write_summary(self.run_dir, {
            **out,
            "data": data.stats,
            "untrained_eval": next((e for e in history["eval"] if e["step"] == 0), None),
            "validation": history.get("validation", []),
            "wall_s": time.perf_counter() - t_start,
            "config": to_dict(cfg),
        })

    def _train(self, ckpt: RunCheckpoints, prog: RMPrograms, data: PairData, state: dict,
               history: dict[str, Any], start: int) -> tuple[dict, dict[str, Any]]:
        """The loop from ``start``: steps, evaluations, checkpoints; then the final
        evaluation and checkpoint. ``(final state, summary entries)``."""
        t, total = self.cfg.train, data.total_steps
        writer = self.writer = open_writer(self.run_dir, resumed=self.resume, start_step=start)
        peak = measure_matmul_peak(
            jnp.bfloat16 if self.cfg.model.dtype == "bfloat16" else jnp.float32, n=1024, repeat=3
        )

        def save(step: int) -> None:
            # Every event up to `step` is on disk before its checkpoint exists: a run killed
            # later resumes from here with no step missing in TensorBoard.
            writer.flush()
            meta = {"data_state": data.batches.get_state(), "step": step, "history": history}
            ckpt.save(step, state, meta)

        with closing(writer), progress(total, start, "train_rm", self.progress) as bar:
            if start == 0:
                _record(writer, history["eval"], 0, prog.evaluator(state["params"]), "eval/",
                        "step 0 (untrained) held-out")
            history.setdefault("validation", [])
            # best validation so far; after a resume it restarts (its parameters are not
            # checkpointed)
            best = BestValidation(t.select_best, t.early_stopping_patience)
            last: dict[str, float] = {}
            end = start
            self._ema = None  # train.ema_decay: the average, restarted on resume
            for step in range(start, total):
                state, last = train_one_step(prog, state, data.batches, t.global_batch_size, peak)
                end = step + 1
                if t.ema_decay is not None:
                    self._ema = (jax.tree.map(jnp.copy, state["params"]) if self._ema is None
                                 else _ema_update(self._ema, state["params"], t.ema_decay))
                if due(t.log_every, end) or end == total:
                    writer.scalars(end, last, "train/")
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.2f}",
                                lr=f"{last['learning_rate']:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
                if due(t.eval_every, end, total):
                    self._evaluate(prog, state, writer, history, best, end)
                if due(t.save_every, end, total):
                    t0 = time.perf_counter()
                    save(end)
                    writer.scalars(end, {"time/checkpoint_s": time.perf_counter() - t0}, "train/")
                if self.on_step is not None:
                    self.on_step(end, last)
                if best.stop:
                    break
            state, final = self._finish(prog, state, writer, history, best, end)
            if start < end or ckpt.latest_step() is None:
                save(end)
        return state, {
            "steps": end, "planned_steps": total, "stopped_early": best.stop,
            "first_step": start, "steps_run": end - start,
            "best_validation": best.summary(), "final_eval": final or None,
            "last_train": last, "matmul_peak_flops": peak,
        }

    def _evaluate(self, prog: RMPrograms, state: dict, writer: Writer, history: dict[str, Any],
                  best: BestValidation, step: int) -> None:
        """The periodic evaluation: validation (model selection and early stopping look at it
        only) when there is a validation split, else held-out."""
        t0 = time.perf_counter()
        params = state["params"] if self._ema is None else self._ema  # ema_decay: the average
        if prog.evaluator.has_validation:
            m = prog.evaluator(params, validation=True)
            writer.scalars(step, {**m, "time_s": time.perf_counter() - t0}, "validation/")
            history["validation"].append({"step": step, **m})
            log.info("step %d validation: %s", step, _fmt(m))
            best.update(step, m["accuracy"], params)
        else:
            m = prog.evaluator(params)
            writer.scalars(step, {**m, "time_s": time.perf_counter() - t0}, "eval/")
            history["eval"].append({"step": step, **m})
            log.info("step %d held-out: %s", step, _fmt(m))

    def _finish(self, prog: RMPrograms, state: dict, writer: Writer, history: dict[str, Any],
                best: BestValidation, step: int) -> tuple[dict, dict[str, float]]:
        """The last validation, the best-validation parameters kept (``select_best``), the
        final held-out evaluation: ``(state, final held-out metrics)``."""
        if self._ema is not None:  # train.ema_decay: the average replaces the raw parameters
            state = {**state, "params": self._ema}
        if prog.evaluator.has_validation:
            m = prog.evaluator(state["params"], validation=True)
            history["validation"].append({"step": step, **m})
            writer.scalars(step, m, "validation/")
            log.info("step %d validation: %s", step, _fmt(m))
            if m["accuracy"] > best.accuracy:
                best.step, best.accuracy, best.params = step, m["accuracy"], None
            if self.cfg.train.select_best and best.params is not None:
                log.info("keeping the best-validation parameters (step %d, accuracy %.4f)",
                         best.step, best.accuracy)
                state = {**state, "params": best.params}
        final = prog.evaluator(state["params"])
        if final:
            writer.scalars(step, final, "eval/")
            if not history["eval"] or history["eval"][-1]["step"] != step:
                history["eval"].append({"step": step, **final})
            log.info("final held-out: %s", _fmt(final))
        return state, final

    def _nothing_to_train(
        self, step: int, total: int, history: dict[str, Any], data_stats: dict[str, Any],
        t_start: float,
    ) -> dict[str, Any]:
        """A resume whose checkpoint already reached the step budget: train nothing, keep
        ``hf/``, ``summary.json`` and TensorBoard as they are, and say so."""
        nothing_to_train(self.run_dir, step, total, "train.max_steps, or the data's epochs")
        if self.cfg.train.export_hf and not (self.run_dir / "hf" / "config.json").is_file():
            export_hf(self.run_dir, self.graphdef, self.state["params"], self.rest,
                      resolve_tokenizer_path(self.cfg.data.tokenizer))
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


# ---------------------------------------------------------------------- the loop's parts


@dataclasses.dataclass
class PairData:
    """The tokenized pairs of a run. ``validation`` / ``held_out``: ``(pairs, tokenized)`` in
    length order; ``batches``: the checkpointable iterator of training batches (this
    process's rows); ``total_steps``: the step budget."""

    validation: tuple[list[Pair], Any]
    held_out: tuple[list[Pair], Any]
    buckets: tuple[int, ...]
    pad_id: int
    stats: dict[str, Any]
    batches: Any
    total_steps: int


@dataclasses.dataclass
class RMPrograms:
    """What the loop runs: the fresh train state and its shardings, the jitted train step, the
    evaluator, and the model FLOPs per trained token at a sequence length (for the MFU)."""

    graphdef: Any
    rest: Any
    state: dict
    shardings: dict
    train_step: Callable[[dict, dict], tuple[dict, dict]]
    evaluator: PairEvaluator
    scan_layers: bool
    flops_per_token: Callable[[int], float]


def to_global(sharding, batch: dict[str, np.ndarray], keys, whole: bool = False
              ) -> dict[str, jax.Array]:
    """Host batch -> global arrays on ``sharding``. ``whole=True``: every process holds the
    whole global batch (eval) and keeps only its devices' rows; else each holds its own rows
    (``pair_batches``)."""
    return {
        k: jax.make_array_from_process_local_data(
            sharding, batch[k], batch[k].shape if whole else None
        )
        for k in keys
    }


class PairEvaluator:
    """Pairwise metrics of parameters on the validation or held-out pairs, with
    ``by_kind/<kind>/accuracy`` (how the rejected code was made) and
    ``by_positive/<kind>/accuracy`` (canonical or rewrite) where pairs know it."""

    def __init__(self, eval_step: Callable, sharding: Any, data: PairData, batch_size: int):
        self.eval_step, self.sharding, self.data, self.batch_size = (
            eval_step, sharding, data, batch_size)

    @property
    def has_validation(self) -> bool:
        return bool(len(self.data.validation[1]))

    def __call__(self, params: Any, validation: bool = False) -> dict[str, float]:
        pairs, tok = self.data.validation if validation else self.data.held_out
        if not len(tok):
            return {}
        sums: dict[str, float] = {}
        correct: list[float] = []
        for b in eval_batches(tok, batch_size=self.batch_size, buckets=self.data.buckets,
                              pad_id=self.data.pad_id):
            batch = to_global(self.sharding, b, (*BATCH_KEYS, "weight"), whole=True)
            out = jax.device_get(self.eval_step(params, batch))
            correct.extend(np.asarray(out.pop("pair_correct"))[b["weight"] > 0].tolist())
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        metrics = finalize_metrics(sums)
        metrics["pairs"] = float(sums["count"])
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


@dataclasses.dataclass
class BestValidation:
    """The best validation accuracy so far (and, with ``select_best``, a copy of its
    parameters); ``stop`` once ``patience`` evaluations in a row brought no better one."""

    select_best: bool
    patience: int | None
    step: int | None = None
    accuracy: float = -1.0
    since: int = 0
    params: Any = None
    stop: bool = False

    def update(self, step: int, accuracy: float, params: Any) -> None:
        if accuracy > self.accuracy:
            self.step, self.accuracy, self.since = step, accuracy, 0
            if self.select_best:
                self.params = jax.tree.map(jnp.copy, params)
        else:
            self.since += 1
        if self.patience is not None and self.since >= self.patience:
            log.info("early stop at step %d: no better validation accuracy in %d evaluations "
                     "(best %.4f at step %d)", step, self.patience, self.accuracy, self.step)
            self.stop = True

    def summary(self) -> dict[str, Any] | None:
        return None if self.step is None else {"step": self.step, "accuracy": self.accuracy}


@jax.jit
def _ema_update(ema: Any, params: Any, decay: float) -> Any:
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def train_one_step(prog: RMPrograms, state: dict, batches: Any, global_batch_size: int,
                   peak: float) -> tuple[dict, dict[str, float]]:
    """One optimizer step on the next batch: ``(state, train metrics)`` with throughput, MFU
    against the measured matmul ``peak`` and the data / step times."""
    t0 = time.perf_counter()
    batch = next(batches)
    t1 = time.perf_counter()
    state, metrics = prog.train_step(
        state, to_global(prog.evaluator.sharding, batch, BATCH_KEYS))
    metrics = jax.device_get(metrics)
    t2 = time.perf_counter()
    length = batch["chosen_ids"].shape[1]
    tokens = 2 * global_batch_size * length
    real = float(batch["chosen_mask"].sum() + batch["rejected_mask"].sum())
    real *= jax.process_count()
    return state, {
        **finalize_metrics(metrics),
        "grad_norm": float(metrics["grad_norm"]),
        "learning_rate": float(metrics["learning_rate"]),
        "tokens_per_s": tokens / (t2 - t1),
        "real_tokens_per_s": real / (t2 - t1),
        "mfu": tokens * prog.flops_per_token(length) / (t2 - t1) / peak,
        "time/step_s": t2 - t1,
        "time/data_s": t1 - t0,
        "seq_len": length,
    }


def _record(writer: Writer, entries: list, step: int, metrics: dict[str, float], prefix: str,
            what: str) -> None:
    if metrics:
        entries.append({"step": step, **metrics})
        writer.scalars(step, metrics, prefix)
        log.info("%s: %s", what, _fmt(metrics))


def _by_length(pairs: list[Pair], tok) -> tuple[list[Pair], Any]:
    order = np.argsort(tok.lengths(), kind="stable") if len(tok) else []
    return [pairs[i] for i in order], type(tok)(
        [tok.chosen[i] for i in order], [tok.rejected[i] for i in order]
    )


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in m.items())
