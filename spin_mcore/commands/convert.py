"""``spin-mcore convert``: HF safetensors <-> spin_mcore (Megatron dist_checkpointing) model checkpoints.

    spin-mcore convert --from hf --to mcore --src HF_DIR --dst CKPT_DIR --tp N --pp M
    spin-mcore convert --from mcore --to hf --src CKPT_DIR --dst HF_DIR [--dtype bfloat16]

Runs ``tp * pp`` local processes through :func:`spin_mcore.launcher.run_local`,
or uses the ranks of torchrun/srun when launched under them. Everything that can
be checked from headers and configs (architecture, TP/PP divisibility, tensor
names and shapes) is checked before any process starts, with one-line errors.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _precision_for(dtype_name: str):
    """Build the model in fp32 unless the source is bf16, so conversion never loses bits."""
    from spin_mcore.config import PrecisionConfig

    return PrecisionConfig(recipe="bf16" if dtype_name == "bfloat16" else "fp32")


def _quiet() -> None:
    """Megatron and torch.distributed.checkpoint warn about APIs we do not call directly."""
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _init(model_cfg, tp: int, pp: int, dtype_name: str):
    """This rank's stage, uninitialised: both directions overwrite every parameter (the loaders check)."""
    from spin_mcore.config import ParallelConfig
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    pstate = init_distributed(ParallelConfig(tp=tp, pp=pp, distributed_optimizer=False), seed=0)
    return pstate, build_gpt_model(model_cfg, pstate, _precision_for(dtype_name), perform_initialization=False)


def hf_to_mcore_rank(src: str, dst: str, model_cfg, tp: int, pp: int, extra: dict) -> str:
    """One rank of HF -> mcore: build this stage, fill it from ``src``, save a checkpoint to ``dst``."""
    _quiet()
    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.models.hf_convert import load_hf_weights

    pstate, model = _init(model_cfg, tp, pp, extra["hf_dtype"])
    load_hf_weights(model, pstate, src, model_cfg)
    return str(save_model_checkpoint(model, pstate, dst, model_cfg, extra=extra))


def mcore_to_hf_rank(src: str, dst: str, model_cfg, tp: int, pp: int, params_dtype: str, out_dtype: str,
                     hf_config_base, tokenizer_dir) -> str:
    """One rank of mcore -> HF: build this stage, load the checkpoint ``src``, export to ``dst``."""
    _quiet()
    from spin_mcore.models.checkpoint import load_model_checkpoint
    from spin_mcore.models.hf_convert import export_hf

    pstate, model = _init(model_cfg, tp, pp, params_dtype)
    load_model_checkpoint(model, pstate, src)
    return str(export_hf(model, pstate, dst, model_cfg, _torch_dtype(out_dtype),
                         hf_config_base=hf_config_base, tokenizer_dir=tokenizer_dir))


def _validated(model_cfg, tp: int, pp: int):
    from spin_mcore.config import Config, ParallelConfig, validate

    validate(Config(model=model_cfg, parallel=ParallelConfig(tp=tp, pp=pp)))


def _launch(fn, nprocs: int, *args) -> int:
    from spin_mcore.launcher import launched, run_local

    if launched():
        fn(*args)
    else:
        run_local(fn, nprocs, *args)  # a rank's error reaches the user as one line (cli.main)
    return 0


def run(args) -> int:
    import json

    from spin_mcore.config import ModelConfig
    from spin_mcore.hf_config import hf_config_to_fields
    from spin_mcore.models.checkpoint import dtype_name, model_config_from_meta, read_checkpoint_meta
    from spin_mcore.models.hf_convert import check_hf_checkpoint, hf_checkpoint_dtype

    direction = (args.src_format, args.dst_format)
    src, dst = str(Path(args.src).absolute()), str(Path(args.dst).absolute())
    if args.tp < 1 or args.pp < 1:
        raise ValueError(f"--tp={args.tp} --pp={args.pp}: both must be >= 1")
    if direction == ("hf", "mcore"):
        model_cfg = ModelConfig(**hf_config_to_fields(src))
        _validated(model_cfg, args.tp, args.pp)
        check_hf_checkpoint(src, model_cfg)
        hf_dtype = dtype_name(hf_checkpoint_dtype(src))
        hf_config = json.loads((Path(src) / "config.json").read_text())
        extra = {"source": "hf", "hf_dir": src, "hf_dtype": hf_dtype, "hf_config": hf_config}
        rc = _launch(hf_to_mcore_rank, args.tp * args.pp, src, dst, model_cfg, args.tp, args.pp, extra)
    elif direction == ("mcore", "hf"):
        meta = read_checkpoint_meta(src)
        model_cfg = model_config_from_meta(meta)
        _validated(model_cfg, args.tp, args.pp)
        out_dtype = args.dtype if args.dtype != "auto" else meta.get("hf_dtype", meta["params_dtype"])
        tokenizer = args.tokenizer or meta.get("hf_dir")
        if tokenizer is not None and not Path(tokenizer).is_dir():
            if args.tokenizer:
                raise FileNotFoundError(f"--tokenizer {tokenizer} is not a directory")
            tokenizer = None  # the original HF directory is gone: export weights and config only
        rc = _launch(mcore_to_hf_rank, args.tp * args.pp, src, dst, model_cfg, args.tp, args.pp,
                     meta["params_dtype"], out_dtype, meta.get("hf_config"), tokenizer)
    else:
        raise ValueError(f"--from {args.src_format} --to {args.dst_format}: supported are hf->mcore and mcore->hf")
    if rc == 0 and os.environ.get("RANK", "0") == "0":
        print(f"spin-mcore convert: wrote {dst} ({args.src_format} -> {args.dst_format}, tp={args.tp} pp={args.pp})")
    return rc


def register(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert HF safetensors <-> spin_mcore (Megatron) model checkpoints",
        description="Convert a Llama/Mistral HF safetensors directory to a spin_mcore model checkpoint "
        "(Megatron dist_checkpointing, loadable at any TP/PP) or back. Runs tp*pp local processes "
        "(or uses the ranks of torchrun/srun). Exporting an imported checkpoint reproduces the HF "
        "tensors bitwise.",
        epilog="examples:\n"
        "  spin-mcore convert --from hf --to mcore --src hf/zephyr-7b-sft --dst ckpt/iter0 --tp 2\n"
        "  spin-mcore convert --from mcore --to hf --src ckpt/iter1 --dst hf/iter1 --dtype bfloat16",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="src_format", choices=("hf", "mcore"), required=True, help="format of --src")
    p.add_argument("--to", dest="dst_format", choices=("hf", "mcore"), required=True, help="format of --dst")
    p.add_argument("--src", required=True, help="source directory (HF: config.json + *.safetensors; mcore: a checkpoint)")
    p.add_argument("--dst", required=True, help="destination directory (written atomically; replaced if it exists)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size used for the conversion (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used for the conversion (default 1)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="mcore->hf: dtype of the written weights; auto = the dtype of the HF checkpoint "
                   "the model was imported from, else the checkpoint's parameter dtype")
    p.add_argument("--tokenizer", default=None,
                   help="mcore->hf: directory whose tokenizer files are copied next to the weights "
                   "(default: the HF directory the checkpoint was imported from, if it still exists)")
    p.set_defaults(func=run)
