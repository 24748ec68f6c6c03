"""The native convolution layer by layer: VM-H's convolutions at one input size, each timed alone.

    python benchmarks/conv_layers.py                       # input 80x96x112 (OASIS / 2)
    python benchmarks/conv_layers.py --shape 160 192 224   # OASIS size
    python benchmarks/conv_layers.py --direct              # the direct kernel on every layer (no Winograd)

For every convolution of the paper's VM (the decoder's upsample-and-concatenate fused into the first convolution of
each level, as the network runs it):
the algorithm that ran it (Winograd or direct), median latency of the forward pass (bias and LeakyReLU included),
GFLOP/s (2 flops per multiply-add of a direct convolution, the useful ones only) and that as a fraction of the FMA peak that ``cpu_peak.py`` measures on the same CPUs;
the last row sums the layers. Writes ``<out>/conv_layers.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from _child import timed
from common import HERE, machine, write


def vm_layers(shape):
    """``(name, input spatial shape, C_in, C_out, stride, C_skip)`` of every convolution of VM at input
    ``shape``; ``C_skip > 0``: the decoder's first convolution of a level, whose input is
    ``concat(upsample(C_in - C_skip channels), C_skip skip channels)`` (one fused op, as the network runs it)."""
    s = np.asarray(shape)
    enc = [
        ("enc0", s, 2, 16, 2, 0),
        ("enc1", s // 2, 16, 32, 2, 0),
        ("enc2", s // 4, 32, 32, 2, 0),
        ("enc3", s // 8, 32, 32, 2, 0),
    ]
    dec = [
        ("dec4", s // 16, 32, 32, 1, 0),
        ("dec3", s // 8, 64, 32, 1, 32),
        ("dec2", s // 4, 64, 32, 1, 32),
        ("dec1a", s // 2, 48, 32, 1, 16),
        ("dec1b", s // 2, 32, 32, 1, 0),
        ("dec0a", s, 34, 16, 1, 2),
        ("dec0b", s, 16, 16, 1, 0),
        ("flow", s, 16, 3, 1, 0),
    ]
    return [(n, tuple(int(v) for v in sp), ci, co, st, sk) for n, sp, ci, co, st, sk in enc + dec]


def useful_gflop(spatial, cin, cout, stride) -> float:
    out = np.prod([-(-n // stride) for n in spatial])
    return 2.0 * 27 * cin * cout * out / 1e9


def time_layer(spatial, cin, cout, stride, repeats, act=True, skip=0):
    import jax
    import jax.numpy as jnp

    from crd_jax.ops.conv import conv, conv_upsampled_concat

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    w = jax.random.normal(k[1], (3, 3, 3, cin, cout), jnp.float32) * 0.1
    b = jax.random.normal(k[2], (cout,), jnp.float32)
    slope = 0.2 if act else None
    if skip:
        low = jax.random.normal(k[0], (1, *(-(-n // 2) for n in spatial), cin - skip), jnp.float32)
        fine = jax.random.normal(k[3], (1, *spatial, skip), jnp.float32)
        fn = jax.jit(lambda low, fine, w, b: conv_upsampled_concat(low, fine, w, b, negative_slope=slope))
        return timed(lambda: jax.block_until_ready(fn(low, fine, w, b)), repeats)["latency_s"]
    x = jax.random.normal(k[0], (1, *spatial, cin), jnp.float32)
    fn = jax.jit(lambda x, w, b: conv(x, w, b, stride=stride, negative_slope=slope))
    return timed(lambda: jax.block_until_ready(fn(x, w, b)), repeats)["latency_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=(80, 96, 112))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak", type=float, default=None, help="FMA peak in GFLOP/s (default: measured now)")
    p.add_argument("--isa", choices=("avx2", "avx512"), default=None, help="force the kernel's vector width")
    p.add_argument("--bf16", action="store_true", help="the opt-in bfloat16 inference path (AMX or AVX512-BF16)")
    p.add_argument("--direct", action="store_true", help="the direct kernel on every layer (no Winograd)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "conv_layers")
    args = p.parse_args()

    from crd_jax.ops import native

    if args.isa:
        native.set_isa(args.isa)
    if args.direct:
        native.set_winograd(False)
    if args.bf16:
        import sys

        sys.modules["crd_jax.ops.conv"].bf16_inference(True)
        if not native.has_bf16():
            raise SystemExit("--bf16: this CPU lacks AVX512-BF16")
    if args.peak is None:
        import tempfile

        from cpu_peak import build_peak_library, fma_peak

        n = len(os.sched_getaffinity(0))
        with tempfile.TemporaryDirectory() as tmp:
            dll = build_peak_library(Path(tmp))
            args.peak = max(fma_peak(dll, w, n, 1.0) for w in ([256, 512] if dll.has_avx512() else [256]))
    rows, total_s, total_g = [], 0.0, 0.0
    for name, spatial, cin, cout, stride, skip in vm_layers(args.shape):
        calls = native.winograd_calls()
        latency = time_layer(spatial, cin, cout, stride, args.repeats, act=name != "flow", skip=skip)
        algorithm = "Winograd" if native.winograd_calls() > calls else "direct"
        g = useful_gflop(spatial, cin, cout, stride)
        rows.append(
            {
                "layer": name + (" (up+concat)" if skip else ""),
                "algorithm": algorithm,
                "input": list(spatial),
                "cin": cin,
                "cout": cout,
                "stride": stride,
                "latency_s": latency,
                "gflop": g,
                "gflops": g / latency,
                "fraction_of_peak": g / latency / args.peak,
            }
        )
        total_s += latency
        total_g += g
    m = machine()
    path = native.describe() + (f", bfloat16 inputs and weights, float32 sums, {native.describe_bf16()}" if args.bf16 else "")
    lines = [
        f"### VM-H convolutions one by one, input {'x'.join(map(str, args.shape))} ({m.get('cpu', '')}, {path})",
        "",
        f"Median of {args.repeats}; GFLOP/s counts a direct convolution's multiply-adds (a Winograd layer does about a "
        f"third of them, so its rate can pass the peak); peak {args.peak:.0f} GFLOP/s (FMA loop, same CPUs). "
        "`(up+concat)`: the decoder's upsample-and-concatenate and the convolution as the network runs them "
        "(one fused op, input channels = upsampled + skip).",
        "",
        "| Layer | Algorithm | Input | C_in -> C_out | Stride | Latency (ms) | GFLOP | GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['algorithm']} | {'x'.join(map(str, r['input']))} | {r['cin']} -> {r['cout']} | {r['stride']} | "
            f"{1e3 * r['latency_s']:.1f} | {r['gflop']:.2f} | {r['gflops']:.0f} | {100 * r['fraction_of_peak']:.0f}% |"
        )
    lines.append(
        f"| all | | | | | {1e3 * total_s:.1f} | {total_g:.2f} | {total_g / total_s:.0f} | "
        f"{100 * total_g / total_s / args.peak:.0f}% |"
    )
    write(
        args.out,
        {
            "machine": m,
            "shape": list(args.shape),
            "peak_gflops": args.peak,
            "conv": path,
            "rows": rows,
            "total_s": total_s,
            "total_gflop": total_g,
        },
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
