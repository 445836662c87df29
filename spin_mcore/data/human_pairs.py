"""Trainer records and pair stages made from the SFT data alone (no generation).

    sft_records(prompts)                       -> [{prompt_id, prompt_ids, real_ids}]
    write_human_pairs(directory, prompts, ps)  -> a pair stage whose generated side is y itself

The second lets the reference pass score the human response y under any policy (held-out NLL), in the
same sharded-stage format as the pairs SPIN trains on. The demo and the verifier loops both use it.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist


def sft_records(prompts) -> list[dict]:
    """Trainer records of tokenised prompts (:class:`~spin_mcore.data.tokenize.TokenizedPrompt`): ``prompt_id``,
    ``prompt_ids`` (list[int], BOS + templated prompt) and ``real_ids`` (list[int], y + EOS)."""
    return [{"prompt_id": p.id, "prompt_ids": p.prompt_ids, "real_ids": p.response_ids} for p in prompts]


def write_human_pairs(directory: Path, prompts, pstate) -> Path:
    """A pair stage in ``directory`` whose "generated" side is the human response (``generated_ids`` =
    ``real_ids``), written once by the logging rank; every rank returns ``directory`` after a barrier."""
    from spin_mcore.utils.shards import ShardedStage, fingerprint

    records = [{**r, "generated_ids": r["real_ids"], "sample_index": 0} for r in sft_records(prompts)]
    if pstate.is_logging_rank:
        stage = ShardedStage(directory, "human_pairs", fingerprint([r["prompt_id"] for r in records]))
        if not stage.complete:
            stage.write_shard(0, records)
            stage.finalize({"records": len(records)})
    if dist.is_initialized():  # the other ranks read the stage next
        dist.barrier()
    return directory
