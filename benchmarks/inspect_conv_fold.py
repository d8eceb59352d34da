"""Offline sm_90 compile of the conv-folded decode kernels (no GPU): the fused SSM step and the
x_proj GEMV with and without the conv-step input, registers and spills (inspect_kernels' report).

    PYTHONPATH=. python3 benchmarks/inspect_conv_fold.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import inspect_kernels as ik  # noqa: E402  (drops TRITON_INTERPRET before triton loads)

from falcon_mamba.ops import triton_decode, triton_gemv  # noqa: E402

bf, f32 = "*bf16", "*fp32"
base = dict(N=16, NP=16, RP=256, BD=triton_decode.SSM_BLOCK_D, HAS_Z=True, HAS_D=True, HAS_DTB=True,
            NORM=True, DT_PROJ=True, A_LOG=True, RMODE=1, RB=256, PDL=False, HAS_CB=True, ROUND_X=1)
ptrs = dict(state_ptr=f32, x_ptr=bf, z_ptr=bf, dtr_ptr=bf, b_ptr=bf, c_ptr=bf, wdt_ptr=bf, dtb_ptr=bf,
            a_ptr=bf, dskip_ptr=bf, y_ptr=bf, cst_ptr=bf, cw_ptr=bf, cb_ptr=bf, eps="fp32")
for cin in (False, True):
    k = ik.compile_one(triton_decode._ssm_step_kernel, ptrs, dict(base, CONV_IN=cin, CK=4), triton_decode.SSM_WARPS)
    ik.report(f"ssm_step fused CONV_IN={cin}", k)
gptrs = dict(x_ptr=bf, res_ptr=bf, wn_ptr=bf, hout_ptr=f32, eps="fp32", s_ptr=f32, z_ptr="*u8", y_ptr=bf,
             part_ptr=f32, cnt_ptr="*i32", cst_ptr=bf, cw_ptr=bf, cb_ptr=bf, xc_ptr=bf)
K = 8192
for fmt, wt, cfg in [(0, bf, triton_gemv.GemvConfig(2, 1024, split=2)), (0, bf, triton_gemv.GemvConfig(16, 512, split=8)),
                     (8, "*i32", triton_gemv.GemvConfig(8, 1024, split=8)), (8, "*i32", triton_gemv.GemvConfig(16, 512, split=8)),
                     (4, "*i32", triton_gemv.GemvConfig(16, 1024, split=8))]:
    for cin in (False, True):
        kps = K // cfg.split
        c = dict(K=K, KL=K, K_PER_SPLIT=kps, FMT=fmt, WORDS=fmt != 0, GROUP=128 if fmt == 4 else 1, BN=cfg.bn, BK=cfg.bk,
                 EVEN_N=True, EVEN_K=True, MASK_X=False, PRO=False, HAS_RES=False, WRITE_H=False, NORM_BK=1024,
                 ROUND_IN=0, ROUND_Y=0, ROUND_U=1 if cin else 0, CONV=False, CK=4, HAS_CB=cin, CIN=cin,
                 SPLIT=cfg.split, LAST=True, ROUND_OUT=0, PDL=False)
        k = ik.compile_one(triton_gemv._gemv_kernel, dict(gptrs, w_ptr=wt), c, cfg.warps)
        ik.report(f"gemv fmt={fmt} bn={cfg.bn} bk={cfg.bk} s={cfg.split} CIN={cin}", k)
