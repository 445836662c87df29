"""NVIDIA DALI in this project: whether it imports, which loader ``data.loader`` picks, and the record reader.

    dali_import_error() / require_dali()        a missing or broken DALI, in one line
    resolve_loader(setting, sources)            -> (name, reason)     data.loader: auto | dali | torch
    DaliRecordReader(files, batch, shard, ...)  fn.readers.numpy over token-store files, checkpointable

The trainer's use of it (the per-step order, the resume) is ``spin_mcore.training.loader``.

Why the order is ours and not DALI's shuffle: ``fn.readers.numpy(random_shuffle=True)`` draws from
a shuffle buffer with its own generator, an order no other loader (and no other DP size) can
reproduce, so the DALI and torch loaders could never give the same batches. The epoch order is
the seeded permutation of ``training.batches.sample_order`` (one per epoch, computed once), and
DALI is handed the file list in that order, laid out rank-major, with ``random_shuffle=False``:
DALI's contiguous shard ``shard_id`` of ``num_shards`` is then exactly that rank's records.
``stick_to_shard=True`` keeps a reader that runs past its shard (prefetch at the end) inside it,
so a rank never opens another rank's records.
"""

from __future__ import annotations

from typing import Optional, Sequence

from spin_mcore.config import ConfigError

DALI_PACKAGE = "nvidia-dali-cuda120"  # the CPU set-up's build (launch/setup_local.sh); GPUs: setup_gpu.sh


def dali_import_error() -> Optional[str]:
    """None when ``nvidia.dali`` imports with its pipeline API; else the reason, one line."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError (OSError of a missing .so, ...)
        text = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return f"{type(exc).__name__}: {text}"
    return None


def require_dali() -> None:
    """Raise :class:`ConfigError` (one line) when ``data.loader=dali`` cannot work here."""
    reason = dali_import_error()
    if reason is not None:
        raise ConfigError(f"data.loader=dali: NVIDIA DALI does not import ({reason}); install {DALI_PACKAGE} "
                          "(launch/setup_local.sh; launch/setup_gpu.sh on GPUs) or set data.loader=torch")


def resolve_loader(setting: str, sources: Sequence) -> tuple[str, str]:
    """(``"dali"`` | ``"torch"``, why) for ``data.loader`` = ``setting`` and the trainer's ``sources``.

    ``sources``: stage directories and/or in-memory records. DALI reads stage directories (their
    token store); in-memory records only have the torch path. Raises ConfigError for ``dali`` when
    DALI does not import or a source is in memory.
    """
    in_memory = any(isinstance(s, dict) for s in sources)
    if setting == "torch":
        return "torch", "data.loader=torch"
    if setting == "dali":
        require_dali()
        if in_memory:
            raise ConfigError("data.loader=dali reads stage directories (their token store); in-memory records "
                              "need data.loader=torch or auto")
        return "dali", "data.loader=dali"
    if setting != "auto":
        raise ConfigError(f"data.loader={setting!r}: expected auto, dali or torch")
    reason = dali_import_error()
    if reason is not None:
        return "torch", f"data.loader=auto: NVIDIA DALI does not import ({reason})"
    if in_memory:
        return "torch", "data.loader=auto: in-memory records"
    return "dali", "data.loader=auto: NVIDIA DALI imports"


class DaliRecordReader:
    """DALI's ``fn.readers.numpy`` over ``files`` (all shards, rank-major), shard ``shard_id`` of ``num_shards``.

    Each :meth:`next` is one batch of ``batch_size`` records of this shard, in ``files`` order, read
    and prefetched (``prefetch`` batches) on DALI's ``num_threads`` threads. ``checkpoint``: bytes from
    :meth:`checkpoint` of a reader over the same ``files``; the new reader continues where that one
    was (``enable_checkpointing=True``). ``device_id``: the rank's CUDA device (DALI stages its
    batches in pinned host memory for it), or None for a CPU-only pipeline.
    """

    def __init__(self, files: Sequence[str], batch_size: int, shard_id: int, num_shards: int,
                 checkpoint: Optional[bytes] = None, device_id: Optional[int] = None, num_threads: int = 2,
                 prefetch: int = 2):
        from nvidia.dali import fn, pipeline_def

        files = list(files)
        if len(files) % (num_shards * batch_size):
            raise ValueError(f"DaliRecordReader: {len(files)} files do not split into {num_shards} shards of whole "
                             f"batches of {batch_size}")

        @pipeline_def(enable_checkpointing=True)
        def records():
            return fn.readers.numpy(files=files, shard_id=shard_id, num_shards=num_shards, random_shuffle=False,
                                    stick_to_shard=True, name="records")

        kwargs = {"checkpoint": checkpoint} if checkpoint is not None else {}
        self.pipe = records(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                            prefetch_queue_depth=prefetch, seed=0, **kwargs)
        self.pipe.build()

    def next(self) -> tuple[list, list[str]]:
        """(arrays: int32 [n_i] numpy each, paths: the file each came from), one batch."""
        (out,) = self.pipe.run()
        return [out.at(j) for j in range(len(out))], [out[j].source_info() for j in range(len(out))]

    def checkpoint(self) -> bytes:
        """The reader's position (the next batch :meth:`next` returns; prefetched batches accounted for)."""
        return self.pipe.checkpoint()

    def close(self) -> None:
        """Release the pipeline (its threads stop when it is collected)."""
        self.pipe = None
