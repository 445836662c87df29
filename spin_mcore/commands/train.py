"""``spin-mcore train CONFIG [key=value ...]``: one SPIN iteration's training (or SFT) from a prepared dataset.

    spin-mcore train configs/tiny.yaml --data runs/x/iter_0/pairs --out runs/x/iter_0/train \\
        --init runs/x/theta_0 --iteration 0 run.nproc=2 train.max_steps=10

``--data`` directories are ShardedStage outputs. For SPIN they must hold the reference
log-probs (``ref_logp_real`` / ``ref_logp_generated``); with ``--reference DIR`` the
reference pass runs first (resumable) on raw generation output and writes DIR.
Re-running the same command after a kill resumes from the newest checkpoint in
``OUT/train_state``. Runs ``run.nproc`` local processes unless started by torchrun/srun.
"""

from __future__ import annotations

import json
import warnings

from spin_mcore.commands.common import add_config_args, split_config_and_overrides


def train_rank(config_path, overrides: list, data: list, out: str, init, iteration: int, reference) -> dict:
    """What every rank runs: (reference pass), then :func:`spin_mcore.training.trainer.train`."""
    warnings.filterwarnings("ignore", category=UserWarning)
    from spin_mcore.config import load_config
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.trainer import setup_model, train

    cfg = load_config(config_path, overrides)
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    if reference:
        from spin_mcore.training.reference import compute_reference_logprobs

        model = setup_model(cfg, pstate, init, wrap_ddp=False)
        compute_reference_logprobs(cfg, model, pstate, data, reference, model_id=str(init))
        del model
        data = [reference]
    summary = train(cfg, pstate, data, init, out, iteration)
    if pstate.is_logging_rank:
        from spin_mcore.config import save_config

        save_config(cfg, f"{out}/config.yaml")
    return summary


def run(args) -> int:
    from spin_mcore.config import load_config
    from spin_mcore.data.preflight import check_data
    from spin_mcore.launcher import launch_rank, launched, run_local
    from spin_mcore.platform.distributed import select_device

    config_path, overrides = split_config_and_overrides(args)
    cfg = load_config(config_path, overrides)  # fail on bad config before any process starts
    check_data(cfg, records=False)  # tokenizer vs model.vocab_size (training reads --data, not data.path)
    select_device(cfg.platform.device)  # platform.device=cuda without CUDA: one clear error, no process started
    init = args.init if args.init is not None else cfg.run.init_checkpoint
    call = (config_path, overrides, list(args.data), args.out, init, args.iteration, args.reference)
    args.log_dir = args.out  # cli.main writes a rank's traceback there
    if launched():
        summary = train_rank(*call)
    else:
        summary = run_local(train_rank, cfg.run.nproc, *call)[0]
    if launch_rank() == 0:  # under srun every rank gets here: print once
        print(json.dumps(summary, default=str))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train one SPIN iteration (or SFT) on a prepared pair dataset",
                       description=__doc__.split("\n\n")[0] + " Resumes from OUT/train_state after a kill.")
    add_config_args(p)
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="a pair (or SFT) stage directory; repeat for several; SPIN needs ref_logp_* fields "
                   "unless --reference is given")
    p.add_argument("--out", required=True, help="output directory: train_state/, metrics.jsonl, tensorboard/, model/")
    p.add_argument("--init", default=None, help="theta_t checkpoint (default run.init_checkpoint; none = random init)")
    p.add_argument("--iteration", type=int, default=0, help="SPIN iteration t: picks spin.beta[t] and train.lr[t]")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="run the reference pass of --init over --data first, writing DIR, then train on DIR")
    p.set_defaults(func=run, preemptible=True)  # SIGUSR1/SIGTERM: save, exit 75 (platform/preemption.py)
