"""``spin-mcore smoke``: build the tiny policy on N processes (TP) and run forward + backward."""

from __future__ import annotations

import warnings


def _smoke_rank(tp: int, seq: int, batch: int) -> dict:
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch

    from spin_mcore.config import load_config
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    cfg = load_config(overrides=["model.preset=tiny", f"parallel.tp={tp}"])
    pstate = init_distributed(cfg.parallel, seed=cfg.train.seed, platform=cfg.platform)
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=gen)
    pos = torch.arange(seq).expand(batch, seq)
    loss = model(ids[:, :-1], pos, attention_mask=None, labels=ids[:, 1:]).float().mean()  # [b, s] CE -> scalar
    loss.backward()
    grad_sq = sum(float(p.grad.float().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return {"rank": pstate.rank, "loss": float(loss), "local_grad_sq": grad_sq,
            "params": sum(p.numel() for p in model.parameters())}


def run(args) -> int:
    from spin_mcore.launcher import run_local

    results = run_local(_smoke_rank, args.nproc, args.nproc, args.seq, args.batch)
    for r in results:
        print(f"rank {r['rank']}: loss {r['loss']:.6f}  local params {r['params']:,}  local |grad|^2 {r['local_grad_sq']:.6e}")
    ok = all(abs(r["loss"] - results[0]["loss"]) < 1e-5 for r in results)
    print("smoke: forward+backward OK on %d processes (TP=%d); loss agrees across TP ranks: %s" % (args.nproc, args.nproc, ok))
    return 0 if ok else 1


def register(sub) -> None:
    p = sub.add_parser("smoke", help="tiny model forward+backward on N local processes (tensor parallel)",
                       description="Build the tiny Llama policy with TP=N over N local CPU/GPU processes and run one forward+backward.")
    p.add_argument("--nproc", type=int, default=2, help="processes = tensor-parallel size (default 2)")
    p.add_argument("--seq", type=int, default=32, help="sequence length")
    p.add_argument("--batch", type=int, default=2, help="batch size")
    p.set_defaults(func=run)
