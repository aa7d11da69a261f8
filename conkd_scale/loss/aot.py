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
    from triton.runtime.jit import JITFunction

    from conkd_scale.loss.triton_kernel import GATE_CODES, conkd_row_kernel

    const = {"GATE": GATE_CODES[gate], "TEMPERED": tempered, "WRITE_GRAD": write_grad,
             "BLOCK_V": block_v, "ACC": tl.float32}  # fmt: skip
    if sparse:
        from conkd_scale.loss.triton_sparse import conkd_row_kernel_sparse

        ptrs = ("z_ptr", "g_ptr", "ids_ptr", "logd_ptr", "logdt_ptr", "mass_ptr", "bits_ptr",
                "logq_ptr", "col_ptr", "y_ptr", "r_ptr", "parts_ptr")  # fmt: skip
        types = (f"*{dtype}",) * 2 + ("*i64",) + ("*fp32",) * 3 + ("*u8", "*fp32", "*i32")
        sig = dict(zip(ptrs, (*types, "*i64", "*i64", "*fp32"), strict=True))
        sig |= {k: "i64" for k in ("stride_z", "stride_g")}
        sig |= {k: "i32" for k in ("N", "V", "I", "K", "NB")}
        sig |= {k: "fp32" for k in ("inv_tau", "tau_sq", "w_ce", "a_kd", "inv_m", "eta",
                                    "c_static")}  # fmt: skip
        sig |= {k: "constexpr" for k in ("GATE", "TEMPERED", "WRITE_GRAD", "BLOCK_V", "BLOCK_K",
                                         "ACC")}  # fmt: skip
        src = ASTSource(fn=JITFunction(conkd_row_kernel_sparse), signature=sig,
                        constexprs=const | {"BLOCK_K": block_k})  # fmt: skip
        return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})  # fmt: skip
    ptr_types = (f"*{dtype}",) * 3 + ("*fp32", "*i32", "*i64", "*i64", "*fp32")
    ptrs = ("z_ptr", "t_ptr", "g_ptr", "logq_ptr", "col_ptr", "y_ptr", "r_ptr", "parts_ptr")
    sig = dict(zip(ptrs, ptr_types, strict=True))
    sig |= {k: "i64" for k in ("stride_z", "stride_t", "stride_g")}
    sig |= {k: "i32" for k in ("N", "V", "I")}
    sig |= {k: "fp32" for k in ("inv_tau", "tau_sq", "w_ce", "a_kd", "inv_m", "eta", "c_static")}
    sig |= {k: "constexpr" for k in ("GATE", "TEMPERED", "WRITE_GRAD", "BLOCK_V", "ACC")}
    src = ASTSource(fn=JITFunction(conkd_row_kernel), signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
