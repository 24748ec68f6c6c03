"""Is the data loader a bottleneck? Seconds per batch of the LPBA40 loader against one training step.

    python benchmarks/loader.py [--root ../shared/data/lpba40] [--batch 1]

Cold: batches whose subjects are read for the first time (gzip decompression + checks + preprocessing);
warm: batches from the in-memory cache. The train step is VM-L's and VM-H's (forward + backward at
160x192x160, batch as given). The loader runs in a background thread ahead of the step, so it costs nothing
while it is faster than the step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import machine, run_child, write  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(HERE.parent.parent / "shared" / "data" / "lpba40"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "loader")
    args = p.parse_args()

    from crd_jax.data import PairLoader, Preprocessor, VolumeDataset, list_subjects, select

    subjects = select(list_subjects("folder", args.root), "0:24")
    ds = VolumeDataset(subjects, Preprocessor(normalize="none", multiple=32), ndim=3, cache_size=64)
    loader = PairLoader(ds, args.batch, seed=0)
    cold, warm = [], []
    seen = set()
    for step in range(400):
        pairs = loader.pairs(step)
        new = any(i not in seen for pair in pairs for i in pair)
        t = time.perf_counter()
        loader.batch(step)
        (cold if new else warm).append(time.perf_counter() - t)
        seen.update(i for pair in pairs for i in pair)
        if len(seen) == len(ds) and len(warm) >= 50:
            break
    steps = {n: run_child("vm", (160, 192, 160), n, "train", 3) for n in (1, 2)}
    lines = [
        f"LPBA40 loader, batch {args.batch} ({machine().get('cpu', '')}, {machine()['cpus']} cores):",
        "",
        "| | seconds |",
        "|---|---|",
        f"| batch with subjects read for the first time (median of {len(cold)}) | {sorted(cold)[len(cold) // 2]:.3f} |",
        f"| batch from the cache (median of {len(warm)}) | {sorted(warm)[len(warm) // 2]:.4f} |",
        f"| VM-H training step at 160x192x160 | {steps[1]['latency_s']:.2f} |",
        f"| VM-L training step (loss at 160x192x160) | {steps[2]['latency_s']:.2f} |",
    ]
    write(args.out, {"cold_s": cold, "warm_s": warm, "steps": steps, "machine": machine()}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
