"""Test helpers: checkpoint reading without Megatron, random pair records, one-shard pair stages."""

from pathlib import Path

import torch


def checkpoint_weights(ckpt_dir) -> dict:
    """{name: full tensor} of ``ckpt_dir/model`` (torch_dist format), cached next to it as ``.pt``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(str(ckpt_dir) + ".pt")
    if not out.exists():
        dcp_to_torch_save(str(Path(ckpt_dir) / "model"), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and "_extra_state" not in k}


def random_pair_records(n: int, seed: int = 0, vocab: int = 500) -> list[dict]:
    """``n`` random generation-stage records: prompt 3-6 tokens, real and generated responses 2-8 tokens."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(1, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_id": i, "prompt_ids": ids(3, 7), "real_ids": ids(2, 9), "generated_ids": ids(2, 9)} for i in range(n)]


def write_pair_stage(path, records: list[dict]) -> None:
    """A complete one-shard generation stage at ``path`` holding ``records``."""
    from spin_mcore.utils.shards import ShardedStage

    stage = ShardedStage(path, "generation", "test")
    stage.write_shard(0, records)
    stage.finalize()
