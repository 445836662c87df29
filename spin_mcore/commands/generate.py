"""``spin-mcore generate CONFIG [key=value ...]``: the opponent-generation stage on its own.

Loads theta_t (``--checkpoint`` mcore dir, ``--hf`` HF dir, else ``run.init_checkpoint``),
the SFT prompts of ``data.path`` (tokenised with ``data.tokenizer``), and writes the
resumable shard directory ``--out`` (default ``RUN_DIR/iter_N/train_generation``, as in the loop). Re-running
the same command resumes a killed run. ``generation.backend=vllm|trtllm`` runs the external engine
exactly as the loop does: one export of theta_t, one engine start for every missing shard.
"""

from __future__ import annotations

from pathlib import Path

from spin_mcore.run_dir import RunDir


def generate_rank(config: str | None, overrides: list[str], out: str, iteration: int, checkpoint: str | None,
                  hf: str | None, force: bool) -> dict:
    """One rank of the stage (module-level so the local launcher can spawn it)."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.config import ConfigError, load_config
    from spin_mcore.data.records import load_sft_records
    from spin_mcore.data.split import split_records
    from spin_mcore.data.tokenize import tokenize_records
    from spin_mcore.data.tokenizer import load_tokenizer
    from spin_mcore.generation.stage import generate_opponent
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    cfg = load_config(config, overrides)
    g = cfg.generation
    if cfg.data.path is None or cfg.data.tokenizer is None:
        raise ConfigError("data.path and data.tokenizer must be set to generate")
    if hf is None and checkpoint is None:
        checkpoint, hf = (None, cfg.run.init_checkpoint) if cfg.run.init_from_hf else (cfg.run.init_checkpoint, None)
    if hf is None and checkpoint is None:
        raise ConfigError("no weights: pass --checkpoint DIR or --hf DIR, or set run.init_checkpoint")
    if g.backend != "megatron":
        from spin_mcore.generation.external import engine_python

        engine_python(g)  # the engine's environment exists: fail before any work

    tok = load_tokenizer(cfg.data.tokenizer)
    records, _ = load_sft_records(cfg.data.path, skip_bad_lines=cfg.data.skip_bad_lines)
    train, _ = split_records(records, cfg.data.heldout_fraction, cfg.data.num_prompts, seed=cfg.data.seed)
    prompts, _ = tokenize_records(train, tok, cfg.data.template, cfg.data.max_prompt_length, cfg.data.max_response_length)

    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    if hf is not None:
        checkpoint_id = f"hf:{Path(hf).absolute()}"
    else:
        from spin_mcore.models.checkpoint import read_checkpoint_meta

        meta = read_checkpoint_meta(checkpoint)
        checkpoint_id = f"mcore:{Path(checkpoint).absolute()}:{meta.get('step', meta.get('iteration', ''))}"

    def load():
        model = build_gpt_model(cfg.model, pstate, cfg.precision, perform_initialization=False)  # loaded next
        if hf is not None:
            from spin_mcore.models.hf_convert import load_hf_weights

            load_hf_weights(model, pstate, hf, cfg.model)
        else:
            from spin_mcore.models.checkpoint import load_model_checkpoint

            load_model_checkpoint(model, pstate, checkpoint)
        return model.eval()

    if g.backend != "megatron":  # one engine start; its export and job files live in the stage directory
        from spin_mcore.generation import external

        return external.generate_with_engine(cfg, pstate, load, [("train", prompts, Path(out))], tok, iteration,
                                             checkpoint_id, Path(out), force=force)
    return generate_opponent(cfg, load(), pstate, prompts, tok, out, iteration, force=force,
                             checkpoint_id=checkpoint_id)


def run(args) -> int:
    from spin_mcore.commands.common import split_config_and_overrides
    from spin_mcore.config import load_config
    from spin_mcore.data.preflight import check_data
    from spin_mcore.generation.external import preflight
    from spin_mcore.launcher import launched, run_local
    from spin_mcore.platform.distributed import select_device

    config, overrides = split_config_and_overrides(args)
    cfg = load_config(config, overrides)  # validate here, before spawning
    check_data(cfg, heldout=False)  # data file, split sizes, tokenizer vs model.vocab_size
    device = select_device(cfg.platform.device)  # platform.device=cuda without CUDA: one clear error, no process started
    preflight(cfg, device)  # generation.backend=vllm|trtllm: runs here, its environment exists
    out = args.out or str(RunDir(cfg.run.dir).iteration(args.iteration) / "train_generation")
    fn_args = (config, overrides, out, args.iteration, args.checkpoint, args.hf, args.force)
    args.log_dir = out  # cli.main writes a rank's traceback there
    if launched():
        generate_rank(*fn_args)
        return 0
    run_local(generate_rank, args.nproc or cfg.run.nproc, *fn_args)
    print(f"spin-mcore generate: wrote {out}")
    return 0


def register(sub) -> None:
    from spin_mcore.commands.common import add_config_args

    p = sub.add_parser("generate", help="generate opponent responses y' for every prompt (resumable shards)",
                       description=__doc__)
    add_config_args(p)
    p.add_argument("--out", help="output stage directory (default RUN_DIR/iter_N/train_generation, as in the loop)")
    p.add_argument("--iteration", type=int, default=0, help="SPIN iteration t (recorded and fingerprinted)")
    p.add_argument("--checkpoint", help="mcore checkpoint directory holding theta_t")
    p.add_argument("--hf", help="HF safetensors directory holding theta_t")
    p.add_argument("--force", action="store_true", help="overwrite an output directory made with another config")
    p.add_argument("--nproc", type=int, default=None, help="local processes (default run.nproc)")
    p.set_defaults(func=run, preemptible=True)  # SIGUSR1/SIGTERM: save, exit 75 (platform/preemption.py)
