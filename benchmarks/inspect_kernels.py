"""Compile every Triton kernel launch of the package for sm_90a on any machine (no GPU) and report
what costs no device time: registers, spills, stack, shared memory, occupancy, layout conversions,
barriers and SASS size, under the Triton that is imported.

    PYTHONPATH=. python3 benchmarks/inspect_kernels.py [--only TEXT] [--json OUT] [--dump DIR]
    PYTHONPATH=/work/tri36:. python3 benchmarks/inspect_kernels.py --json a.json     # another Triton
    python3 benchmarks/inspect_kernels.py --compare a.json b.json [--out TXT]       # side by side

The launches are benchmarks/kernel_cases.py's: the package's launchers called at the 7B shapes with
launches recorded, then each compiled as Triton's JIT would compile it on an H200 (same binder, same
argument specialisation, same options), with a fresh cache so that ptxas runs for every kernel.
Registers, spills and stack come from the ptxas log of that very compile (``ptxas -v``: Triton 3.9
assembles sm_90 with its CUDA 13 ptxas (ptxas-blackwell), whose PTX 9.x the CUDA 12 ``ptxas`` beside
it rejects; an earlier version of this script ran the latter itself and printed regs=None). Identical
specialisations (the same kernel, constexprs and options from several cases) compile once; a row
names its first case and counts the others.

Columns: regs per thread; spill = spill stores + loads (bytes); stack frame (bytes); smem = shared
memory Triton allocates (bytes; layout conversions and reductions go through it); occ = resident
warps per SM out of 64 (registers: 64k per SM in 256-register warp units; shared: 228 KiB per SM, 1
KiB reserved per block; at most 32 blocks); cvt = ttg.convert_layout ops in the TTGIR; bar =
barrier instructions in the PTX; sass = SASS instructions (cuobjdump).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
# a fresh cache: every kernel is compiled (and assembled by ptxas, whose log we read) in this run
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="inspect-kernels-")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REG_FILE, WARP_REG_UNIT, MAX_WARPS, MAX_BLOCKS = 65536, 256, 64, 32
SMEM_SM, SMEM_RESERVED = 228 * 1024, 1024
METRICS = ("regs", "spill", "stack", "smem", "occ", "cvt", "bar", "sass")


def occupancy(regs: int, warps: int, smem: int) -> int:
    """Resident warps per SM of an sm_90 GPU for a kernel of these resources."""
    warp_regs = -(-max(regs, 1) * 32 // WARP_REG_UNIT) * WARP_REG_UNIT
    by_regs = (REG_FILE // warp_regs) // warps
    by_smem = SMEM_SM // (smem + SMEM_RESERVED)
    return min(by_regs, by_smem, MAX_BLOCKS, MAX_WARPS // warps) * warps


class _PtxasLog:
    """Stands in for the ``subprocess`` module inside Triton's NVIDIA compiler: keeps the log of each
    ``ptxas -v`` run that Triton starts (it writes it to a temporary file and deletes it)."""

    def __init__(self, real):
        self.real, self.logs, self.cmds = real, [], []

    def run(self, cmd, *args, **kwargs):
        r = self.real.run(cmd, *args, **kwargs)
        err = kwargs.get("stderr")
        if isinstance(cmd, (list, tuple)) and "-v" in cmd and hasattr(err, "name"):
            with open(err.name) as f:
                self.logs.append(f.read())
            self.cmds.append([os.path.basename(str(c)) for c in cmd])
        return r

    def __getattr__(self, name):
        return getattr(self.real, name)


def parse_ptxas(log: str) -> dict:
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    stores, loads = num(r"(\d+) bytes spill stores"), num(r"(\d+) bytes spill loads")
    return {"regs": num(r"Used (\d+) registers"), "stack": num(r"(\d+) bytes stack frame"),
            "spill": None if stores is None else stores + (loads or 0), "spill_stores": stores,
            "spill_loads": loads}


def sass_text(cubin: bytes, tool: str) -> str | None:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin")
        with open(p, "wb") as f:
            f.write(cubin)
        r = subprocess.run([tool, "-sass", p], capture_output=True, text=True)
    return None if r.returncode else r.stdout


def sass_count(cubin: bytes, tool: str) -> int | None:
    text = sass_text(cubin, tool)
    return None if text is None else len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", text, flags=re.M))


def specialise(launch, backend):
    """A recorded launch as JITFunction.run would specialise it for the target: (ASTSource arguments,
    options, a key naming the specialisation, its constexprs by name, the main options)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.kernel, dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # what run() adds, where it exists
        if hasattr(knobs.compilation, opt):
            kwargs[opt] = getattr(knobs.compilation, opt)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    names = list(fn.arg_names)
    consts = {names[p[0]]: _plain(v) for p, v in constexprs.items()}
    opts = {k: options.__dict__.get(k)
            for k in ("num_warps", "num_stages", "launch_pdl", "enable_fp_fusion", "maxnreg")}
    key_src = json.dumps([fn.fn.__name__, signature, sorted(consts.items()),
                          sorted((str(k), str(v)) for k, v in attrs.items()), sorted(opts.items())],
                         default=str)
    key = fn.fn.__name__ + ":" + hashlib.sha1(key_src.encode()).hexdigest()[:12]
    return (fn, signature, constexprs, attrs), options, key, consts, opts


def compile_one(src_args, options, target, log: _PtxasLog):
    """triton.compile of one specialisation; (the compiled kernel, its ptxas log or None)."""
    import triton
    from triton.compiler import ASTSource

    n_logs = len(log.logs)
    k = triton.compile(ASTSource(*src_args), target=target, options=options.__dict__)
    return k, (log.logs[n_logs] if len(log.logs) > n_logs else None)


def _plain(v):
    v = getattr(v, "value", v)
    return v if isinstance(v, (bool, int, float, str, type(None))) else str(v)


def measure(k, ptxas_log: str | None, cuobjdump: str) -> dict:
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    m = parse_ptxas(ptxas_log or "")
    m["smem"] = k.metadata.shared
    m["cvt"] = ttgir.count("ttg.convert_layout")
    m["bar"] = len(re.findall(r"\b(?:bar|barrier)(?:\.cta)?\.sync\b", ptx))
    m["sass"] = sass_count(k.asm["cubin"], cuobjdump)
    warps = k.metadata.num_warps
    m["occ"] = occupancy(m["regs"], warps, m["smem"]) if m["regs"] is not None else None
    m["ptx_version"] = (re.search(r"^\.version (\S+)", ptx, flags=re.M) or [None, None])[1]
    return m


def inspect(only: str | None, dump: str | None) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia import compiler as nvc
    from triton.compiler import make_backend

    from benchmarks.kernel_cases import recorded_launches

    log = _PtxasLog(nvc.subprocess)
    nvc.subprocess = log
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    ptxas = nvc.get_ptxas(90).path
    ptxas_version = re.findall(r"release (\S+),", subprocess.run([ptxas, "--version"], capture_output=True,
                                                                 text=True).stdout)
    cuobjdump = knobs.nvidia.cuobjdump.path
    rows: dict[str, dict] = {}
    t0 = time.time()
    launches = recorded_launches(only)
    seen: dict[str, int] = {}
    for i, launch in enumerate(launches):
        # the launch's name in every run: its case, its kernel, and which of that case's launches of it
        lid = f"{launch.case} [{launch.name}]"
        seen[lid] = seen.get(lid, 0) + 1
        lid += f" #{seen[lid]}" if seen[lid] > 1 else ""
        print(f"[{i + 1}/{len(launches)}] {lid}", file=sys.stderr, flush=True)
        src_args, options, key, consts, opts = specialise(launch, backend)
        if key in rows:
            rows[key]["ids"].append(lid)
            continue
        k, plog = compile_one(src_args, options, target, log)
        m = measure(k, plog, cuobjdump)
        rows[key] = {"key": key, "kernel": launch.name, "case": launch.case, "ids": [lid],
                     "constexprs": consts, "options": opts, **m}
        if dump:
            base = os.path.join(dump, f"{len(rows):03d}-{launch.name}")
            for ext in ("ttgir", "ptx"):
                with open(f"{base}.{ext}", "w") as f:
                    f.write(k.asm[ext])
            with open(f"{base}.ptxas.log", "w") as f:
                f.write(plog or "")
            with open(f"{base}.sass", "w") as f:
                f.write(sass_text(k.asm["cubin"], cuobjdump) or "")
    return {"triton": triton.__version__, "ptxas": ptxas_version[0] if ptxas_version else None,
            "ptxas_cmd": log.cmds[0] if log.cmds else None, "target": "sm_90a",
            "compile_s": round(time.time() - t0, 1), "kernels": list(rows.values())}


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def table(res: dict) -> str:
    lines = [f"Triton {res['triton']}, ptxas {res['ptxas']}, {res['target']}: {len(res['kernels'])} distinct "
             f"kernel specialisations",
             f"{'case (first of its specialisation) [kernel] warps':<92} "
             + " ".join(f"{m:>6}" for m in METRICS)]
    for r in res["kernels"]:
        more = f" +{len(r['ids']) - 1}" if len(r["ids"]) > 1 else ""
        label = f"{r['case']}{more} [{r['kernel']}] w{r['options']['num_warps']}"
        lines.append(f"{label[:92]:<92} " + " ".join(f"{_fmt(r[m]):>6}" for m in METRICS))
    return "\n".join(lines)


def _regressed(a: dict, b: dict) -> tuple[list[str], list[str]]:
    """How b (the newer Triton) is worse than a for one kernel: (regressions, minor ones). A regression:
    any more spills or stack, occupancy down by a quarter or more, >25% (and 16+) more registers,
    >25% (and 64+) more SASS. Minor: fewer resident warps by a smaller step (a few registers more)."""
    major, minor = [], []
    for m in ("spill", "stack"):
        if (b[m] or 0) > (a[m] or 0):
            major.append(f"{m} {_fmt(a[m])} -> {_fmt(b[m])}")
    regs = f"regs {a['regs']} -> {b['regs']}"
    if a["occ"] and b["occ"] and b["occ"] < a["occ"]:
        occ = f"occupancy {a['occ']} -> {b['occ']} warps/SM ({regs}"
        occ += f", smem {a['smem']} -> {b['smem']})" if b["smem"] > a["smem"] else ")"
        (major if b["occ"] <= 0.75 * a["occ"] else minor).append(occ)
    elif a["regs"] and b["regs"] and b["regs"] > 1.25 * a["regs"] and b["regs"] - a["regs"] >= 16:
        major.append(regs)
    if a["sass"] and b["sass"] and b["sass"] > 1.25 * a["sass"] and b["sass"] - a["sass"] >= 64:
        major.append(f"SASS {a['sass']} -> {b['sass']} instructions")
    return major, minor


def compare(a: dict, b: dict) -> str:
    """Side-by-side text of two runs (a the older Triton): each of a's kernels beside the one that b
    compiled for the same launch (its first)."""
    bk = {lid: r for r in b["kernels"] for lid in r["ids"]}
    head = (f"Triton {a['triton']} (ptxas {a['ptxas']}) vs Triton {b['triton']} (ptxas {b['ptxas']}), "
            f"{a['target']}, every kernel launch of falcon_mamba at the 7B shapes "
            f"(benchmarks/kernel_cases.py).\nEach cell: {a['triton']} / {b['triton']}. "
            + __doc__.split("Columns: ")[1].strip().replace("\n", " "))
    lines = [head, "", f"{'case (first of its specialisation) [kernel] warps':<84} "
             + " ".join(f"{m:>11}" for m in METRICS)]
    notes, small, missing = [], [], []
    for r in a["kernels"]:
        s = bk.get(r["ids"][0])
        more = f" +{len(r['ids']) - 1}" if len(r["ids"]) > 1 else ""
        label = f"{r['case']}{more} [{r['kernel']}] w{r['options']['num_warps']}"
        if s is None:
            missing.append(label)
            continue
        cells = " ".join(f"{_fmt(r[m]) + '/' + _fmt(s[m]):>11}" for m in METRICS)
        major, minor = _regressed(r, s)
        flag = " <-" if major else (" <" if minor else "")
        lines.append(f"{label[:84]:<84} {cells}{flag}")
        if major:
            notes.append(f"- {label}: " + "; ".join(major + minor))
        elif minor:
            small.append(f"- {label}: " + "; ".join(minor))
    lines += ["", f"Regressions under {b['triton']} (<-: more spills or stack, occupancy down by a quarter "
              f"or more, >25% more registers or SASS): {len(notes)}"] + (notes or ["- none"])
    lines += ["", f"Minor (<: one occupancy step lower, a few registers more): {len(small)}"]
    lines += small or ["- none"]
    if missing:
        lines += ["", "Not in the second run (a case it did not have):"]
        lines += [f"- {m}" for m in missing]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="only the cases whose name contains this text")
    ap.add_argument("--json", default=None, help="write the measurements here")
    ap.add_argument("--dump", default=None, help="write each kernel's TTGIR, PTX, SASS and ptxas log here")
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two --json files")
    ap.add_argument("--out", default=None, help="with --compare: write the text here, and OLD+NEW as .json")
    args = ap.parse_args()
    if args.compare:
        a, b = (json.load(open(p)) for p in args.compare)
        text = compare(a, b)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
            with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
                json.dump({"runs": [a, b]}, f, indent=1)
        return
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    res = inspect(args.only, args.dump)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({"triton": res["triton"], "kernels": len(res["kernels"]),
                      "compile_s": res["compile_s"]}))


if __name__ == "__main__":
    main()
