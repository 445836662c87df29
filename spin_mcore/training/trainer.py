"""One SPIN iteration's training (theta_t -> theta_{t+1}), or plain SFT, on Megatron-Core.

    train(cfg, pstate, data, init_checkpoint, out_dir, iteration) -> summary

Order of one run:
    setup_model      build this rank's stage, load theta_t (or take the iteration's resident one), wrap in
                     Megatron DDP
    build_optimizer  RMSProp/Adam in Megatron's wrappers (distributed optimizer when DP > 1)
    resume           the newest complete checkpoint under out_dir/train_state, if any
    loop             train_step per global batch; metrics; a train_state checkpoint every
                     save_interval steps or save_interval_minutes, written in the background
                     (train.async_save) while the next steps run
    save             the in-flight checkpoint published, then the model checkpoint out_dir/model
                     (theta_{t+1}); no train_state at the last step, the model is the result

On SIGUSR1/SIGTERM (:mod:`spin_mcore.platform.preemption`) every rank finishes the
current step, saves a train checkpoint as the save interval would, waits for it to be
published and raises ``Preempted``; the next run resumes from it like from any other checkpoint.
A run killed after its last step but before the model is saved resumes from the newest
published checkpoint and trains the rest again (the same steps: bitwise the same model on CPU).
A run that finds its complete model (with the loop summary in its metadata) trains nothing.

Where this departs from the paper (Chen et al. 2024, Algorithm 1): nothing in the
objective. Steps whose loss or gradient is not finite are skipped (no update; the
LR schedule still advances with the data position) and counted; the last partial global batch of the sample
order is dropped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from spin_mcore.config import ConfigError, per_iteration
from spin_mcore.platform import preemption
from spin_mcore.training.batches import collate, make_plan, open_training_data, pad_multiple, step_microbatches
from spin_mcore.training.loader import open_steps
from spin_mcore.training.metrics import MetricsLogger
from spin_mcore.training.reference import loss_spec
from spin_mcore.training.step import STAT_NAMES, rows_per_microbatch, train_step
from spin_mcore.training.train_checkpoint import CheckpointWriter, latest_checkpoint, load_train_checkpoint


class TooManySkippedSteps(RuntimeError):
    """More than ``train.max_skipped_steps`` steps had a non-finite loss or gradient."""


def setup_model(cfg, pstate, init_checkpoint: Optional[str] = None, wrap_ddp: bool = True):
    """This rank's policy stage with theta_t loaded, ready for Megatron's schedules.

    Sets ``calculate_per_token_loss`` and ``finalize_model_grads_func`` on the model config
    (see :mod:`spin_mcore.training.step` for why) before wrapping in DDP. Returns the DDP
    model (or the bare ``GPTModel`` when ``wrap_ddp`` is False); with ``parallel.vp > 1`` a
    :class:`~spin_mcore.models.chunks.ModelChunks` of them, one per virtual stage.
    """
    model = build_policy(cfg, pstate, init_checkpoint)
    return wrap_for_training(cfg, model) if wrap_ddp else model


def build_policy(cfg, pstate, init_checkpoint: Optional[str] = None):
    """This rank's bare policy stage in the training layout (``GPTModel``, or ``ModelChunks`` with
    ``parallel.vp > 1``), with ``init_checkpoint`` loaded and the training flags set on its config.

    It serves inference as it is (generation, export, reference passes:
    :class:`~spin_mcore.training.resident.ResidentPolicy`) and training after
    :func:`wrap_for_training`, so one load of theta_t serves a whole iteration.
    """
    from megatron.core.distributed import finalize_model_grads

    from spin_mcore.models.chunks import model_chunks
    from spin_mcore.models.gpt import build_gpt_chunks
    from spin_mcore.utils.heap import use_mmap_for_large_allocations

    if pstate.device.type == "cpu":
        # Freed activations go back to the OS instead of fragmenting glibc's heap (-570 MB peak
        # RSS at benchmarks/spin_step.py --size large; see spin_mcore/utils/heap.py).
        use_mmap_for_large_allocations()

    # A checkpoint overwrites every parameter (both loaders check), so Megatron's random init
    # would be wasted work; without one the seeded init is the model. Built for DDP even when it
    # serves inference first: the same model is wrapped for training later.
    model = build_gpt_chunks(cfg.model, pstate, cfg.precision, cfg.parallel.vp, recompute=cfg.train.recompute,
                             sequence_parallel=cfg.parallel.sequence_parallel, fused_kernels=cfg.train.fused_kernels,
                             perform_initialization=not init_checkpoint, for_ddp=True)
    if init_checkpoint:
        from spin_mcore.models.checkpoint import is_model_checkpoint, load_model_checkpoint

        # The directory says what it is: with run.init_from_hf the loop converts theta_0 once,
        # and every later iterate is a spin_mcore checkpoint under the same config.
        if cfg.run.init_from_hf and not is_model_checkpoint(init_checkpoint):
            from spin_mcore.models.fp8 import drop_high_precision_init_vals
            from spin_mcore.models.hf_convert import load_hf_weights

            for chunk in model_chunks(model):  # each chunk knows its global layer numbers
                load_hf_weights(chunk, pstate, init_checkpoint, cfg.model)
                # The HF loader keeps no high-precision copy: FP8 params' main params then come from
                # the loaded (quantised) params, not from TE's never-initialised init value.
                drop_high_precision_init_vals(chunk)
        else:
            load_model_checkpoint(model, pstate, init_checkpoint)
    for chunk in model_chunks(model):
        chunk.config.calculate_per_token_loss = True
        chunk.config.finalize_model_grads_func = finalize_model_grads
    return model


def wrap_for_training(cfg, model):
    """``model`` from :func:`build_policy` in Megatron DDP (one wrapper per chunk), in train mode."""
    from megatron.core.distributed import DistributedDataParallel

    from spin_mcore.models.chunks import model_chunks, wrap_chunks
    from spin_mcore.training.optimizer import build_ddp_config, set_grad_sync_funcs

    chunks = model_chunks(model)
    ddp_cfg = build_ddp_config(cfg.parallel)
    # As Megatron's get_model: buckets only for the first chunk; the later chunks' reductions
    # overlap with the interleaved schedule's compute anyway.
    wrapped = [DistributedDataParallel(chunk.config, ddp_cfg, chunk, disable_bucketing=i > 0)
               for i, chunk in enumerate(chunks)]
    set_grad_sync_funcs(wrapped, ddp_cfg)
    out = wrap_chunks(wrapped)
    out.train()
    return out


def _finished_loop(model_dir: Path, total_steps: int) -> Optional[dict]:
    """The loop summary stored with a complete final model of this run (``total_steps`` steps), or None.

    No train_state is saved at the last step, so a re-run of a finished stage (or one killed between
    the model save and the caller's next step) learns from the model's metadata that nothing is
    left. Every rank reads the same files.
    """
    from spin_mcore.models.checkpoint import is_model_checkpoint, read_checkpoint_meta

    if not is_model_checkpoint(model_dir):
        return None
    meta = read_checkpoint_meta(model_dir)
    loop = meta.get("train_loop")
    if meta.get("steps") != total_steps or not isinstance(loop, dict) or loop.get("total_steps") != total_steps:
        return None
    return loop


def _minutes_due(since: float, minutes: Optional[float]) -> bool:
    """Collective when ``minutes`` is set: rank 0's clock says whether ``minutes`` passed since ``since``.

    Each rank's clock would cross the line at a different step; one rank's verdict, broadcast,
    makes every rank save after the same step (a save is a collective).
    """
    if minutes is None:
        return False
    import torch.distributed as dist

    due = time.monotonic() - since >= minutes * 60.0
    if not dist.is_initialized():
        return due
    flag = torch.tensor([int(due)], dtype=torch.int32)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def use_async_save(t_cfg) -> bool:
    """train.async_save: ``auto`` is on (Megatron's async save runs on CUDA and, emulated, on CPU/gloo)."""
    return str(t_cfg.async_save).lower() != "false"


def _step_metrics(stats: torch.Tensor, objective: str, grad_norm: float, lr: float, seconds: float,
                  skipped_total: int) -> dict:
    s = dict(zip(STAT_NAMES, stats.tolist()))
    n = max(s["valid"], 1.0)
    out = {"loss": s["loss"], "grad_norm": grad_norm, "lr": lr, "tokens_per_s": s["tokens"] / max(seconds, 1e-9),
           "step_seconds": seconds, "skipped_steps": skipped_total, "truncated": s["truncated"]}
    if objective == "spin":
        out.update(margin=s["margin_sum"] / n, accuracy=s["correct"] / n,
                   logp_real=s["real_logp_sum"] / n, logp_generated=s["gen_logp_sum"] / n)
    else:
        out.update(logp_real=s["real_logp_sum"] / n)
    return out


def train(cfg, pstate, data: Sequence, init_checkpoint: Optional[str], out_dir, iteration: int = 0,
          load_model: Optional[Callable[[], object]] = None) -> dict:
    """Train one iteration on ``data``; collective over all ranks. Resumes from ``out_dir`` when possible.

    Args:
        data: ShardedStage directories and/or in-memory records. SPIN records need ``prompt_ids``,
            ``real_ids``, ``generated_ids``, ``ref_logp_real``, ``ref_logp_generated``; SFT
            records (``train.objective=sft``) need ``prompt_ids`` and ``real_ids``/``response_ids``.
        init_checkpoint: theta_t (model checkpoint dir; HF dir with ``run.init_from_hf``); None keeps
            the seeded random init (tests).
        out_dir: run directory of this iteration: ``train_state/``, ``metrics.jsonl``,
            ``tensorboard/`` and the final model checkpoint ``model/``.
        iteration: SPIN iteration t (selects beta and peak LR).
        load_model: ``() -> model``, theta_t already built by :func:`build_policy` (the iteration's
            resident model, which training then owns and changes); called only when steps remain.
            None builds and loads ``init_checkpoint`` here.
    Returns a summary dict (same on every rank): steps, skipped, final metrics, model path, seconds.
    Raises TooManySkippedSteps past ``train.max_skipped_steps`` non-finite steps, and
    ``Preempted`` after saving a checkpoint when a stop signal arrived (see module docstring).
    """
    from spin_mcore.models.checkpoint import prestart_save_queue, save_model_checkpoint
    from spin_mcore.models.gpt import params_dtype
    from spin_mcore.training.optimizer import build_optimizer
    from spin_mcore.training.schedule import build_lr_schedule

    t_cfg = cfg.train
    out_dir = Path(out_dir)
    objective = t_cfg.objective
    records = open_training_data(cfg.data.loader, list(data), objective, pstate.rank)  # data.loader: dali | torch
    plan, total_steps = make_plan(records.n_items, t_cfg.epochs, t_cfg.seed, t_cfg.global_batch_size,
                                  t_cfg.micro_batch_size, pstate.dp, t_cfg.max_steps)
    model_dir = (out_dir / "model").absolute()  # the loop records it in eval.json: independent of the cwd
    done = _finished_loop(model_dir, total_steps)
    if done is not None:
        return _summary(total_steps, total_steps, done["skipped"], done["tokens"], done["last"], model_dir, 0.0,
                        None, objective, t_cfg, plan, bool(t_cfg.pack_sequences), 0)
    spec = loss_spec(cfg, pstate, iteration)
    seq_len = cfg.model.seq_length
    packed = bool(t_cfg.pack_sequences)
    if packed:
        import dataclasses

        from spin_mcore.training.packed import pack_microbatches, packed_qkv_format, packed_row_length

        if objective != "spin":
            raise ConfigError("train.pack_sequences=true needs train.objective=spin")
        spec = dataclasses.replace(spec, qkv_format=packed_qkv_format(pstate))
        row_len = packed_row_length(seq_len, t_cfg.micro_batch_size)
    positions = 0  # row positions this rank ran through the model (padding included)
    peak_lr = float(per_iteration(t_cfg.lr, iteration))

    prestart_save_queue()  # every training run ends with a save: its first-save set-up overlaps the steps
    if load_model is not None:
        model = wrap_for_training(cfg, load_model())
    else:
        model = setup_model(cfg, pstate, init_checkpoint)
    dtype = params_dtype(cfg.precision, pstate.device.type == "cuda")
    use_dist_opt = cfg.parallel.distributed_optimizer
    optimizer = build_optimizer(t_cfg, [model], peak_lr, use_dist_opt, dtype, precision=cfg.precision)
    scheduler = build_lr_schedule(optimizer, peak_lr, total_steps, t_cfg.warmup_fraction)

    state_root = out_dir / "train_state"
    step, skipped, tokens_seen = 0, 0, 0.0
    last: dict = {}  # metrics of the latest step: the summary's "final", kept across resumes
    resume_from = latest_checkpoint(state_root)
    if resume_from is not None:
        loop = load_train_checkpoint(resume_from, model, optimizer, scheduler, pstate,
                                     data_reader=records.loader == "dali")
        step, skipped, tokens_seen = int(loop["step"]), int(loop["skipped"]), float(loop["tokens"])
        # A run killed after its last checkpoint resumes with no step left: the summary still
        # reports the last step's metrics, as the uninterrupted run does.
        last = dict(loop.get("last") or {})
        if loop.get("total_steps", total_steps) != total_steps:
            raise ConfigError(f"{resume_from}: was trained for {loop['total_steps']} steps, this config gives "
                              f"{total_steps}; use a fresh output directory")

    # DALI resumes from its own reader checkpoint (saved with the train_state); torch from the step.
    reader = open_steps(records, plan, total_steps, pstate, step, loop.get("reader_state") if resume_from else None)
    writer = CheckpointWriter(state_root, pstate, keep=t_cfg.keep_checkpoints, async_save=use_async_save(t_cfg))

    def save_state() -> None:
        nonlocal last_save
        writer.save(step, model, optimizer, scheduler,
                    {"skipped": skipped, "tokens": tokens_seen, "total_steps": total_steps, "last": last},
                    reader_state=reader.state())
        last_save = time.monotonic()

    model.train()
    start = time.perf_counter()
    last_save = time.monotonic()  # save_interval_minutes counts from here, then from each save
    logger = MetricsLogger(out_dir, pstate.is_logging_rank, total_steps, start_step=step)
    failed = True
    try:
        if resume_from is not None:
            logger.message(f"resumed from {resume_from} at step {step}/{total_steps}")
        logger.message(f"data loader: {records.loader} ({records.reason})")
        while step < total_steps:
            t0 = time.perf_counter()
            if packed:
                # All of this rank's pairs of the step are packed together: same pairs, fewer rows.
                micro, _ = pack_microbatches(reader.step_examples(step), seq_len, t_cfg.micro_batch_size,
                                             multiple=pad_multiple(cfg))
            else:
                micro = [collate(group, seq_len, objective, multiple=pad_multiple(cfg))
                         for group in step_microbatches(reader.step_examples(step), t_cfg.micro_batch_size)]
            positions += sum(b["tokens"].numel() for b in micro)
            lr = float(scheduler.get_lr())
            result = train_step(model, optimizer, micro, spec, row_len if packed else seq_len,
                                t_cfg.micro_batch_size, pstate, t_cfg.clip_grad, rows=1 if packed else None)
            if result["skipped"]:
                skipped += 1
                logger.message(f"step {step + 1}: non-finite loss or grad norm "
                               f"(loss={float(result['stats'][0])}, grad_norm={result['grad_norm']}); skipped "
                               f"({skipped} so far, limit train.max_skipped_steps={t_cfg.max_skipped_steps})")
                if skipped > t_cfg.max_skipped_steps:
                    raise TooManySkippedSteps(
                        f"stopping at step {step + 1}: {skipped} steps skipped for non-finite loss/grad "
                        f"(train.max_skipped_steps={t_cfg.max_skipped_steps}); check the data, the LR and the reference log-probs")
            # The schedule follows the data position, skipped or not, so a run with a skip
            # stays on the same LR curve as one without.
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - t0
            tokens_seen += float(result["stats"][STAT_NAMES.index("tokens")])
            last = _step_metrics(result["stats"], objective, result["grad_norm"], lr, seconds, skipped)
            if step % max(t_cfg.log_interval, 1) == 0 or step == total_steps:
                logger.log(step, last)
            writer.poll()  # publishes the previous save once every rank's writer is done
            # Not at the last step: the model checkpoint below is the result, and a run killed
            # before it is written retrains from the newest published checkpoint.
            saved = step < total_steps and (step % max(t_cfg.save_interval, 1) == 0
                                            or _minutes_due(last_save, t_cfg.save_interval_minutes))
            if saved:
                save_state()
            # Collective (one int all-reduced): every rank stops after the same step.
            if step < total_steps and preemption.stop_requested():
                if not saved:
                    save_state()
                writer.finish()  # published before the exit: the re-run resumes from this step
                stop = preemption.preempted(f"training step {step}/{total_steps}")
                logger.message(f"{stop.signal_name}: stopped after step {step}/{total_steps}, "
                               f"checkpoint saved in {state_root}; re-run to resume")
                raise stop
        writer.finish()  # the last interval save is published before the model save
        failed = False
    finally:
        if failed:
            writer.abort()  # its save stays unpublished; a re-run resumes from the one before
        reader.close()
        logger.close()

    # theta_{t+1} carries the optimizer's fp32 main params (as bf16) when the params are FP8: the
    # next iteration starts from it, and an FP8 rounding would drop updates below the e4m3 spacing.
    # train_loop: what a re-run needs to report this run without training (see _finished_loop).
    save_model_checkpoint(model, pstate, model_dir, cfg.model, optimizer=optimizer,
                          extra={"iteration": iteration + 1, "objective": objective, "steps": step,
                                 "train_loop": {"skipped": skipped, "tokens": tokens_seen, "last": last,
                                                "total_steps": total_steps}})
    return _summary(step, total_steps, skipped, tokens_seen, last, model_dir, time.perf_counter() - start,
                    resume_from, objective, t_cfg, plan, packed, positions)


def _summary(step, total_steps, skipped, tokens, last, model_dir, seconds, resume_from, objective, t_cfg, plan,
             packed, positions) -> dict:
    """train()'s result (the same on every rank)."""
    return {"steps": step, "total_steps": total_steps, "skipped_steps": skipped, "tokens": tokens,
            "final": last, "model": str(model_dir), "seconds": round(seconds, 3),
            "resumed_from": str(resume_from) if resume_from else None,
            "rows_per_microbatch": 1 if packed else rows_per_microbatch(objective, t_cfg.micro_batch_size),
            "num_microbatches": plan.num_microbatches, "packed": packed, "positions_this_rank": positions}
