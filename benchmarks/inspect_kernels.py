"""Compile the Triton kernels for sm_90 on any machine (no GPU needed) and report what costs no
device time: layout conversions in the TTGIR, barriers in the PTX, registers and spills from ptxas.

    PYTHONPATH=. python3 benchmarks/inspect_kernels.py [--dump DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from falcon_mamba.ops import triton_conv, triton_decode, triton_scan  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(fn, ptr_types: dict, consts: dict, num_warps: int, int_default="i32"):
    sig = {}
    for n in fn.arg_names:
        sig[n] = "constexpr" if n in consts else ptr_types.get(n, int_default)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def report(name, k, dump=None):
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    conv = ttgir.count("ttg.convert_layout")
    bars = len(re.findall(r"bar\.sync", ptx))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        out = subprocess.run([PTXAS, "-v", "-arch=sm_90a", p, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    print(f"{name:<44} convert_layout={conv:<3} bar.sync={bars:<3} regs={regs and regs.group(1)} "
          f"spill_stores={spill and spill.group(1)} stack={stack and stack.group(1)} "
          f"ex2={ptx.count('ex2.approx')}")
    if dump:
        open(os.path.join(dump, name.split()[0] + ".ttgir"), "w").write(ttgir)
        open(os.path.join(dump, name.split()[0] + ".ptx"), "w").write(ptx)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None)
    args = ap.parse_args()
    bf, f32 = "*bf16", "*fp32"
    scan_ptrs = dict(x_ptr=bf, dt_ptr=bf, z_ptr=bf, b_ptr=bf, c_ptr=bf, a_ptr=f32, dskip_ptr=f32,
                     dtb_ptr=f32, h0_ptr=f32, rst_ptr="*u8", y_ptr=bf, hT_ptr=f32, chk_ptr=f32,
                     sum_ptr=f32)
    for bd, t, w, only in [(32, 8, 1, False), (32, 8, 1, True), (32, 16, 1, False), (64, 8, 2, False)]:
        k = compile_one(triton_scan._scan_fwd_kernel, scan_ptrs,
                        dict(N=16, NP=16, BD=bd, T=t, CHKS=128, HAS_Z=True, HAS_D=True, HAS_DTB=True,
                             HAS_H0=True, HAS_RST=False, SAVE_CHK=False, DEFER=True, STATE_ONLY=only,
                             STORE_HT=True), w)
        report(f"scan_fwd{'_state' if only else ''} bd={bd} T={t} w={w}", k, args.dump)
    k = compile_one(triton_scan._scan_carry_kernel, dict(hloc_ptr=f32, sum_ptr=f32, a_ptr=f32, h0_ptr=f32,
                                                         hT_ptr=f32),
                    dict(N=16, NP=16, BD=32, HAS_H0=True), 1)
    report("scan_carry bd=32", k, args.dump)
    bwd_ptrs = dict(scan_ptrs, chk_ptr=f32, dy_ptr=bf, dhT_ptr=f32, scr_ptr=f32, dx_ptr=bf, ddt_ptr=bf,
                    dz_ptr=bf, db_ptr=f32, dc_ptr=f32, dA_ptr=f32, dD_ptr=f32, ddtb_ptr=f32, dh0_ptr=f32)
    k = compile_one(triton_scan._scan_bwd_kernel, bwd_ptrs,
                    dict(N=16, NP=16, BD=triton_scan.BWD_BLOCK_D, CHKS=128, HAS_Z=True, HAS_D=True,
                         HAS_DTB=True, HAS_RST=True, HAS_DHT=True), triton_scan.BWD_WARPS)
    report("scan_bwd", k, args.dump)
    k = compile_one(triton_conv._conv_fwd_kernel, dict(x_ptr=bf, w_ptr=bf, bias_ptr=bf, s_ptr=bf,
                                                       rst_ptr="*u8", y_ptr=bf),
                    dict(K=4, BL=triton_conv.BLOCK_L, BD=triton_conv.BLOCK_D, HAS_BIAS=True,
                         HAS_STATE=True, HAS_RST=False, SILU=True), triton_conv.WARPS)
    report("conv_fwd", k, args.dump)
    # dt_proj's weight: dense bf16, int8 (codes + fp32 row scales), int4 g128 (packed + fp16 scales + zeros)
    dt_weights = [(0, bf, f32, f32, 1), (8, "*i8", f32, f32, 1), (4, "*u8", "*fp16", "*u8", 128)]
    for wq, wdt, wsc, wz, wg in dt_weights:
        k = compile_one(triton_decode._ssm_step_kernel,
                        dict(state_ptr=f32, x_ptr=bf, z_ptr=bf, dtr_ptr=bf, b_ptr=bf, c_ptr=bf, wdt_ptr=wdt,
                             dtb_ptr=f32, a_ptr=f32, dskip_ptr=f32, y_ptr=bf, eps="fp32", wsc_ptr=wsc,
                             wz_ptr=wz),
                        dict(N=16, NP=16, RP=256, BD=triton_decode.SSM_BLOCK_D, HAS_Z=True, HAS_D=True,
                             HAS_DTB=True, NORM=True, DT_PROJ=True, A_LOG=True, RMODE=1, RB=64,
                             CONV_IN=False, CK=2, HAS_CB=False, ROUND_X=1, WQ=wq, WG=wg),
                        triton_decode.SSM_WARPS)
        report(("ssm_step" + (f"_int{wq}" if wq else "")) + " fused", k, args.dump)  # --dump: one file each
    k = compile_one(triton_decode._conv_step_kernel, dict(state_ptr=bf, x_ptr=bf, w_ptr=bf,
                                                          bias_ptr=bf, y_ptr=bf),
                    dict(K=4, BD=256, HAS_BIAS=True, SILU=True), 2)
    report("conv_step", k, args.dump)
    k = compile_one(triton_decode._rms_kernel, dict(x_ptr=f32, res_ptr=bf, w_ptr=bf, xo_ptr=f32,
                                                    y_ptr=bf, eps="fp32"),
                    dict(BR=1, BH=4096, HAS_RES=True, HAS_W=True, WRITE_X=True, ROUND_IN=1,
                         ROUND_Y=1), triton_decode.RMS_WARPS)
    report("add_rms_norm H=4096", k, args.dump)


if __name__ == "__main__":
    main()
