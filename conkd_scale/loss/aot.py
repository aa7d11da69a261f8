"""Ahead-of-time compilation of the Triton ConKD kernel, for checks without a GPU."""

from __future__ import annotations

from typing import Any

__all__ = ["aot_compile"]


def aot_compile(
    dtype: str = "bf16",
    gate: str = "hard",
    tempered: bool = False,
    block_v: int = 4096,
    num_warps: int = 16,
    arch: int = 90,
    write_grad: bool = True,
    sparse: bool = False,
    block_k: int = 32,
) -> Any:
    """Compile the kernel ahead of time for CUDA ``sm_<arch>`` without a GPU (Triton's bundled
    ptxas); returns the ``CompiledKernel`` (``.asm["ptx"]``, ``.asm["cubin"]``). A check that
    the compiler, not only the interpreter, accepts the kernel. Call it in a process that
    never had ``TRITON_INTERPRET`` set: the interpreter leaves state in ``triton.language``.
    ``dtype``: the logits' Triton type name (bf16, fp16, fp32). ``sparse``: the kernel of a
    sparse dialogue teacher (loss/triton_sparse.py) with ``block_k`` top-k lanes."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from conkd_scale.loss.triton_common import GATE_CODES, jit_kernel

    const = {"GATE": GATE_CODES[gate], "TEMPERED": tempered, "WRITE_GRAD": write_grad,
             "BLOCK_V": block_v, "ACC": tl.float32}  # fmt: skip
    ptrs = ["z_ptr", "g_ptr", "logq_ptr", "col_ptr", "y_ptr", "r_ptr", "parts_ptr"]
    sig = dict(zip(ptrs, (f"*{dtype}", f"*{dtype}", "*fp32", "*i32", "*i64", "*i64", "*fp32"),
                   strict=True))  # fmt: skip
    sig |= {k: "i64" for k in ("stride_z", "stride_g")}
    sig |= {k: "i32" for k in ("N", "V", "I")}
    sig |= {k: "fp32" for k in ("inv_tau", "tau_sq", "w_ce", "a_kd", "inv_m", "eta", "c_static")}
    if sparse:
        from conkd_scale.loss.triton_sparse import conkd_row_kernel_sparse as kernel

        sig |= {"ids_ptr": "*i64", "logd_ptr": "*fp32", "logdt_ptr": "*fp32", "mass_ptr": "*fp32",
                "bits_ptr": "*u8", "K": "i32", "NB": "i32"}  # fmt: skip
        const |= {"BLOCK_K": block_k}
    else:
        from conkd_scale.loss.triton_kernel import conkd_row_kernel as kernel

        sig |= {"t_ptr": f"*{dtype}", "stride_t": "i64"}
    sig |= {k: "constexpr" for k in const}
    fn = jit_kernel(kernel)
    sig = {name: sig[name] for name in fn.arg_names}  # the kernel's parameter order
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
