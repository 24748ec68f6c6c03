"""The machine's FMA peak, and how close the native convolution and a whole VM inference come to it, from
1 to all the CPUs this process may use.

    python benchmarks/cpu_peak.py                          # VM-H inference at 80x96x112 (OASIS / 2)
    python benchmarks/cpu_peak.py --shape 160 192 224      # at OASIS size (slower)

The CPU model changes between sessions, so every efficiency figure is against the peak measured here:

* FMA peak: ``csrc/fma_peak.cc``, 12 independent FMA chains per thread for a second (AVX2, and AVX-512 where
  the CPU has it), one thread per CPU, GFLOP/s summed (2 flops per lane per FMA);
* VM-H inference: XLA's flop count of the model (written with ``lax.conv``) over the median latency of the
  native path, in a fresh process pinned to the first k CPUs (``sched_setaffinity``: XLA's pool and the
  kernel's both size themselves by the affinity mask).

Writes ``<out>/cpu_peak.{md,json}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from common import HERE, machine, run_child, write


def build_peak_library(folder: Path) -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        raise SystemExit("cpu_peak.py needs a C++ compiler (set CXX)")
    lib = folder / "fma_peak.so"
    subprocess.run([compiler, "-O3", "-shared", "-fPIC", str(HERE / "csrc" / "fma_peak.cc"), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    dll.fma_gflops.restype = ctypes.c_double
    dll.fma_gflops.argtypes = [ctypes.c_int, ctypes.c_double]
    return dll


def fma_peak(dll, width: int, threads: int, seconds: float) -> float:
    """Summed GFLOP/s of ``threads`` threads, each on its own CPU (ctypes releases the GIL)."""
    cpus = sorted(os.sched_getaffinity(0))
    results = [0.0] * threads

    def work(i):
        os.sched_setaffinity(threading.get_native_id(), {cpus[i % len(cpus)]})
        results[i] = dll.fma_gflops(width, seconds)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.sched_setaffinity(threading.get_native_id(), set(cpus))
    return float(sum(results))


def fma_peak_gflops(seconds: float = 0.5, tries: int = 3) -> dict:
    """The FMA peak at the widest vector width (:func:`fma_peak`): all the process's threads at once, and one thread
    alone times the threads (on a shared machine the first is what is left to us, the second the machine's), each
    the best of ``tries`` tries of ``seconds``."""
    from crd_jax.ops import native

    with tempfile.TemporaryDirectory() as folder:  # the library stays loaded once its file is gone
        dll = build_peak_library(Path(folder))
    width = 512 if native.isa() == "avx512" else 256
    threads = native.threads()
    together = max(fma_peak(dll, width, threads, seconds) for _ in range(tries))
    alone = max(fma_peak(dll, width, 1, seconds) for _ in range(tries))
    return {"threads": threads, "all_threads": together, "one_thread_x_threads": alone * threads}


def recorded_peak(payload) -> float:
    """The FMA peak ``results/cpu_peak.json`` recorded for this CPU model and thread count (a quieter session: the
    probe run alongside measures what a shared machine leaves), 0 where it has none."""
    path = HERE / "results" / "cpu_peak.json"
    if not path.exists():
        return 0.0
    recorded = json.loads(path.read_text())
    if recorded.get("machine", {}).get("cpu") != payload["machine"].get("cpu"):
        return 0.0
    threads = payload["fma_peak"]["threads"]
    for row in recorded.get("rows", []):
        if row.get("cpus") == threads:
            return max(row["peak"].values())
    return 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(80, 96, 112))
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "cpu_peak")
    args = p.parse_args()

    n = len(os.sched_getaffinity(0))
    counts = sorted({1, n} | {k for k in (2, 4, 8, 16) if k < n})
    with tempfile.TemporaryDirectory() as tmp:
        dll = build_peak_library(Path(tmp))
        widths = [256] + ([512] if dll.has_avx512() else [])
        peak = {w: {k: fma_peak(dll, w, k, args.seconds) for k in counts} for w in widths}
    best = {k: max(peak[w][k] for w in widths) for k in counts}
    infer = {k: run_child("vm", args.shape, 1, "infer", args.repeats, flops=True, cpus=k) for k in counts}

    m = machine()
    lines = [
        f"### FMA peak and VM-H inference efficiency ({m.get('cpu', '')}, {n} CPUs)",
        "",
        f"VM-H inference at {'x'.join(map(str, args.shape))}, native convolution path, median of {args.repeats}; "
        "GFLOP/s = XLA's flop count (a direct convolution's; the Winograd layers do about a third of their "
        "multiply-adds, so the rate can pass the peak) / latency; peak = the FMA loop of "
        "`benchmarks/csrc/fma_peak.cc` on the same CPUs.",
        "",
        "| CPUs | FMA peak AVX2 (GFLOP/s) | "
        + ("FMA peak AVX-512 | " if 512 in peak else "")
        + "VM-H latency (s) | VM-H GFLOP/s | % of AVX2 peak | % of the machine's peak | speed-up vs 1 CPU |",
        "|---|---|" + ("---|" if 512 in peak else "") + "---|---|---|---|---|",
    ]
    base = infer[counts[0]].get("latency_s")
    rows = []
    for k in counts:
        r = infer[k]
        if "error" in r:
            lines.append(
                f"| {k} | {peak[256][k]:.0f} | " + (f"{peak[512][k]:.0f} | " if 512 in peak else "") + "failed | | | | |"
            )
            continue
        gflops = r["gflop"] / r["latency_s"]
        rows.append(
            {
                "cpus": k,
                "peak": {str(w): peak[w][k] for w in widths},
                "latency_s": r["latency_s"],
                "gflop": r["gflop"],
                "gflops": gflops,
                "fraction_of_avx2_peak": gflops / peak[256][k],
                "fraction_of_peak": gflops / best[k],
            }
        )
        lines.append(
            f"| {k} | {peak[256][k]:.0f} | "
            + (f"{peak[512][k]:.0f} | " if 512 in peak else "")
            + f"{r['latency_s']:.3f} | {gflops:.0f} | {100 * gflops / peak[256][k]:.0f}% | {100 * gflops / best[k]:.0f}% "
            f"| {base / r['latency_s']:.2f}x |"
        )
    from crd_jax.ops import native

    lines += [
        "",
        f"Convolution path: {native.describe()}. The AVX-512 column is the same FMA loop with 16 lanes (some "
        "CPUs, Zen 4 among them, run it at the AVX2 rate, so 512-bit vectors add no peak there, only fewer "
        "instructions and twice the registers)."
        if 512 in peak
        else f"Convolution path: {native.describe()}.",
    ]
    bf16 = native.bf16_speedup()
    if bf16:
        engine = {"amx": "AMX TDPBF16PS", "avx512-bf16": "VDPBF16PS"}[native.bf16_engine()]
        lines += [
            "",
            f"bfloat16 (`--bf16`): {engine} multiply-adds per second / float32 FMA multiply-adds per second "
            f"on one CPU = {bf16:.2f} (`crd_jax.ops.native.bf16_speedup()`; below 1.2 `crd-jax register --bf16` "
            "says in its log that it is unlikely to be faster).",
        ]
    write(
        args.out,
        {"machine": m, "shape": args.shape, "rows": rows, "bf16_speedup": bf16, "bf16_engine": native.bf16_engine()},
        "\n".join(lines).rstrip() + "\n",
    )


if __name__ == "__main__":
    main()
