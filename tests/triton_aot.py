"""Ahead-of-time compile of the fused log-prob kernels for sm_90 (H100), without a GPU.

Run as a script in its own process: ``python tests/triton_aot.py [--n-valid-divisible]``.

The compile is specialised the way a real launch is (Triton's JIT marks a pointer 16-byte
aligned and an integer divisible by 16 with ``tt.divisibility=16``; ``ASTSource(attrs=...)``
takes the same ``{(arg index,): [["tt.divisibility", 16]]}``): pointers, strides, the padded
width ``V_local`` and ``vocab_start`` divisible, and ``n_valid`` odd (a TP shard of a
vocabulary such as 32001), unless ``--n-valid-divisible`` is given. Without any attrs nothing
is known to be aligned and no load vectorises whatever the kernel does.
It must run with ``TRITON_INTERPRET=0``: under the interpreter ``triton.compile`` builds the
IR with the interpreter's builder and fails (``'value' object has no attribute 'dtype'``), and
a warm ``~/.triton/cache`` hides that failure by serving an earlier compile. The caller gives
it an empty ``TRITON_CACHE_DIR`` so nothing is served from a cache.

Prints one JSON line: per kernel, the cubin size and the number of vectorised global loads in
its PTX (``ld.global.v2``/``v4``), so tests can check code generation as well as compilation.
"""

from __future__ import annotations

import json
import os
import re
import sys

SIGNATURES = {
    "_fwd_partials_kernel": {"logits_ptr": "*bf16", "m_ptr": "*fp32", "s_ptr": "*fp32", "t_ptr": "*fp32",
                             "stride_b": "i64", "stride_s": "i64"},
    "_bwd_kernel": {"logits_ptr": "*bf16", "grad_ptr": "*bf16", "lse_ptr": "*fp32", "g_ptr": "*fp32",
                    "in_stride_b": "i64", "in_stride_s": "i64", "out_stride_b": "i64", "out_stride_s": "i64"},
}
COMMON = {"labels_ptr": "*i64", "keep_ptr": "*u8", "S": "i32", "V_local": "i32", "n_valid": "i32",
          "vocab_start": "i32", "BLOCK": "constexpr"}
# Arguments a real launch sees divisible by 16 (every pointer, too): S = 512 rows, V_local = 16064
# (padded to a multiple of 128 / tp), the strides multiples of V_local, vocab_start = 0 on rank 0.
DIVISIBLE = {"S", "stride_b", "stride_s", "in_stride_b", "in_stride_s", "out_stride_b", "out_stride_s",
             "V_local", "vocab_start"}


def compile_all(n_valid_divisible: bool = False) -> dict:
    """{kernel name: {"cubin_bytes": int, "vector_loads": int}} for sm_90, num_warps 8, BLOCK 4096,
    specialised as a launch with an odd ``n_valid`` (or a divisible one with ``n_valid_divisible``)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("triton_aot.py needs TRITON_INTERPRET=0 (the interpreter cannot compile to cubin)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spin_kernels import fused_logprob as k

    out = {}
    for name, own in SIGNATURES.items():
        fn = getattr(k, name)
        sig = {**own, **COMMON}
        sig = {arg: sig[arg] for arg in fn.arg_names}
        divisible = DIVISIBLE | ({"n_valid"} if n_valid_divisible else set())
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
                 if sig[arg].startswith("*") or arg in divisible}
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": 4096}, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        ptx = compiled.asm["ptx"]
        out[name] = {"cubin_bytes": len(compiled.asm["cubin"]),
                     "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]", ptx))}
    return out


if __name__ == "__main__":
    try:
        result = compile_all(n_valid_divisible="--n-valid-divisible" in sys.argv[1:])
    except FileNotFoundError as exc:  # no bundled ptxas on this platform
        print(json.dumps({"skip": f"ptxas unavailable: {exc}"}))
        sys.exit(0)
    print(json.dumps(result))
