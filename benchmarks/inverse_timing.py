"""``register --inverse``'s inversion at 1 mm: the scipy fixed point (``transforms.invert``, the former path) against
``transforms.invert_fast`` on a smooth field of LPBA40's size (a 20x24x28 random field upsampled by 8, up to a few
voxels), in one process; writes ``benchmarks/results/inverse_timing.{md,json}``.

    python benchmarks/inverse_timing.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main():
    import jax.numpy as jnp

    from common import machine
    from crd_jax.ops.spatial import upsample_field
    from crd_jax.training.pipeline import write_text
    from crd_jax.transforms import invert, invert_fast

    rng = np.random.default_rng(0)
    u = np.asarray(upsample_field(jnp.asarray(rng.normal(size=(1, 20, 24, 28, 3)).astype(np.float32) * 0.12), 8))[0]
    t = time.perf_counter()
    ref = invert(u)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    invert_fast(u)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    fast = invert_fast(u)
    t_warm = time.perf_counter() - t
    out = {
        "shape": list(u.shape[:3]),
        "max_disp_voxels": float(np.abs(u).max()),
        "scipy_s": t_ref,
        "fast_first_call_s": t_first,
        "fast_warm_s": t_warm,
        "max_difference_voxels": float(np.abs(fast - ref).max()),
        "machine": machine(),
    }
    lines = [
        f"### `register --inverse` at 1 mm ({'x'.join(map(str, out['shape']))}), one process ({machine().get('cpu', '')}, "
        f"{machine()['cpus']} CPUs)",
        "",
        "| Inversion | Seconds |",
        "|---|---|",
        f"| scipy fixed point (before) | {t_ref:.1f} |",
        f"| invert_fast, first call (compiles) | {t_first:.1f} |",
        f"| invert_fast, warm | {t_warm:.1f} |",
        "",
        f"Largest difference between the two inverses: {out['max_difference_voxels']:.4f} voxels "
        f"(field up to {out['max_disp_voxels']:.1f} voxels).",
    ]
    write_text(HERE / "results" / "inverse_timing.json", json.dumps(out, indent=1))
    write_text(HERE / "results" / "inverse_timing.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
