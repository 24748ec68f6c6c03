"""What a user feels: ``crd-jax register`` from process start to the last file written, cold and warm.

    python benchmarks/register_e2e.py                    # synthetic pair at OASIS size, shipped default model
    python benchmarks/register_e2e.py --shape 96 112 96 --repeats 2 --out /tmp/e2e   # a quick look

Each run is a fresh ``python -m crd_jax register`` process (wall time from ``Popen`` to exit, peak RSS from
``wait4``) on a fixed/moving pair (and moving labels) at ``--shape``, 1 mm, stored RAS (the shipped models
were trained LPS, so the reorientation path runs too). Rows:

* ``no cache``: ``CRD_JAX_CACHE_DIR=off``, every call compiles (the behaviour before the persistent cache);
* ``cold``: the first call with an empty compilation cache (it fills the cache);
* ``warm``: later calls (median of ``--repeats``), ``.nii.gz`` outputs and with ``--uncompressed``.

The issue's target (issue 14): warm <= 3 s wall and <= 600 MB peak RSS on 2 cores. ``--against COMMIT``
adds warm calls of another commit's code alternating with this tree's (the fair comparison on a shared
machine). Writes ``<out>/register_e2e.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


# The process's own peak RSS at exit (VmHWM belongs to the process image: ``ru_maxrss`` of a child would
# include the benchmark's own size at fork time).
PEAK = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write(next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))))\n"
    "from crd_jax.cli.main import entry\n"
    "sys.argv = ['crd-jax'] + sys.argv[1:]\n"
    "entry()\n"
)


def run_once(argv, env) -> dict:
    """Wall seconds and peak RSS (MB) of one fresh ``crd-jax`` process (``argv``: its arguments)."""
    t0 = time.perf_counter()
    # in a folder with no crd_jax in it: `python -c` puts the working folder first on sys.path, ahead of
    # PYTHONPATH, which would decide which code runs
    proc = subprocess.run([sys.executable, "-c", PEAK, *argv], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"register failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    hwm = next(l for l in proc.stderr.splitlines() if l.startswith("VmHWM"))
    return {"wall_s": wall, "peak_rss_mb": int(hwm.split()[1]) / 1024.0, "stdout": proc.stdout}


def _spread(values, fmt: str) -> str:
    """``median (min-max)`` of repeated calls; one call alone is its value."""
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.median(values)), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def against(commit: str, base: list, env: dict, tmp: Path, repeats: int) -> dict:
    """Warm calls of this tree and of ``commit`` (a temporary git worktree, imported first through
    PYTHONPATH, its own compilation cache) alternating: ``{code: {wall_s: [...], peak_rss_mb: [...]}}``."""
    tree = tmp / "against"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True, capture_output=True)
    try:
        sha = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        codes = {
            "this tree": dict(env, PYTHONPATH=str(ROOT)),
            f"{commit} ({sha})": dict(env, PYTHONPATH=str(tree), CRD_JAX_CACHE_DIR=str(tmp / "cache-against")),
        }
        out = {name: {"wall_s": [], "peak_rss_mb": []} for name in codes}
        for i in range(repeats + 1):  # the first round fills the other commit's cache
            for k, (name, e) in enumerate(codes.items()):
                r = run_once(base + ["--out-dir", str(tmp / f"ab{i}-{k}")], e)
                if i:
                    out[name]["wall_s"].append(r["wall_s"])
                    out[name]["peak_rss_mb"].append(r["peak_rss_mb"])
        return out
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def write_pair(folder: Path, shape) -> tuple:
    import nibabel as nib

    from crd_jax.data import SyntheticConfig, make_subject

    cfg = SyntheticConfig(shape=tuple(shape))
    (fixed, _), (moving, moving_seg) = make_subject(cfg, 0), make_subject(cfg, 1)
    paths = folder / "fixed.nii.gz", folder / "moving.nii.gz", folder / "moving_seg.nii.gz"
    nib.save(nib.Nifti1Image(fixed.astype(np.float32), np.eye(4)), paths[0])
    nib.save(nib.Nifti1Image(moving.astype(np.float32), np.eye(4)), paths[1])
    nib.save(nib.Nifti1Image(moving_seg.astype(np.int16), np.eye(4)), paths[2])
    return paths


def main():
    from common import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a shipped model's name or a model folder (default: the default model)")
    p.add_argument("--shape", type=int, nargs=3, default=(160, 192, 224), help="the pair's size (OASIS: 160 192 224)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--pairs", type=int, default=8, help="pairs in the --pairs row")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument(
        "--against",
        default="",
        help="a git commit: also time warm calls of its code alternating with "
        "this tree's (absolute times on a shared machine drift; the A/B does not)",
    )
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fixed, moving, seg = write_pair(tmp, args.shape)
        base = ["register", "--fixed", str(fixed), "--moving", str(moving), "--moving-seg", str(seg)] + (
            ["--model", args.model] if args.model else []
        )
        env = dict(os.environ, CRD_JAX_CACHE_DIR=str(tmp / "cache"))
        counter = iter(range(10_000))

        def call(extra=(), cache=True):
            out = tmp / f"out{next(counter)}"
            e = env if cache else dict(env, CRD_JAX_CACHE_DIR="off")
            return run_once(base + ["--out-dir", str(out)] + list(extra), e)

        rows = {"no cache (compiles every call)": [call(cache=False)], "cold (fills the cache)": [call()]}
        rows["warm"] = [call() for _ in range(args.repeats)]
        rows["warm, --uncompressed"] = [call(["--uncompressed"]) for _ in range(args.repeats)]
        # many pairs in one process: the model is loaded and compiled once
        csv = tmp / "pairs.csv"
        csv.write_text("".join(f"{fixed},{moving},{seg},pair{i}\n" for i in range(args.pairs)))
        many = [
            run_once(
                ["register", "--pairs", str(csv), "--out-dir", str(tmp / f"many{i}")]
                + (["--model", args.model] if args.model else []),
                env,
            )
            for i in range(args.repeats)
        ]
        version = subprocess.run([sys.executable, "-m", "crd_jax", "--version"], capture_output=True, text=True).stdout.strip()
        ab = against(args.against, base, env, tmp, args.repeats) if args.against else None

    m = machine()
    model_line = next((l for l in rows["warm"][0]["stdout"].splitlines() if l.startswith("registered")), "")
    lines = [
        f"### `crd-jax register` end to end, {'x'.join(map(str, args.shape))} at 1 mm",
        "",
        f"Fresh process per call, interpreter start to the last file written; {args.repeats} warm calls: median (min-max). "
        f"{version}; {m.get('cpu', '')}, {m['cpus']} cores. Target: warm <= 3 s and <= 600 MB.",
        "",
        "| Call | Wall (s) | Peak RSS (MB) |",
        "|---|---|---|",
    ]
    summary = {}
    for name, rs in rows.items():
        wall = float(np.median([r["wall_s"] for r in rs]))
        rss = float(np.median([r["peak_rss_mb"] for r in rs]))
        summary[name] = {"wall_s": wall, "peak_rss_mb": rss, "runs": [{k: r[k] for k in ("wall_s", "peak_rss_mb")} for r in rs]}
        lines.append(
            f"| {name} | {_spread([r['wall_s'] for r in rs], '.2f')} | {_spread([r['peak_rss_mb'] for r in rs], '.0f')} |"
        )
    many_wall = float(np.median([r["wall_s"] for r in many]))
    many_rss = float(np.median([r["peak_rss_mb"] for r in many]))
    summary["pairs"] = {
        "pairs": args.pairs,
        "wall_s": many_wall,
        "peak_rss_mb": many_rss,
        "pairs_per_s": args.pairs / many_wall,
        "runs": [r["wall_s"] for r in many],
    }
    lines.append(
        f"| warm, `--pairs` with {args.pairs} pairs in one process | {many_wall:.2f} "
        f"({args.pairs / many_wall:.2f} pairs/s, {many_wall / args.pairs:.2f} s per pair) | {many_rss:.0f} |"
    )
    lines += ["", f"The command's own log line: `{model_line.split(' with ', 1)[-1]}`" if model_line else ""]
    if ab:
        summary["against"] = ab
        lines += [
            "",
            f"Warm calls alternating in this invocation, this tree against commit `{args.against}`, "
            f"{args.repeats} each: median (min-max).",
            "",
            "| Code | Wall (s) | Peak RSS (MB) |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {_spread(r['wall_s'], '.2f')} | {_spread(r['peak_rss_mb'], '.0f')} |" for name, r in ab.items()]
    md = "\n".join(lines).rstrip() + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "register_e2e.md").write_text(md)
    import json

    (args.out / "register_e2e.json").write_text(
        json.dumps({"shape": args.shape, "model": args.model, "rows": summary, "version": version, "machine": m}, indent=2)
    )
    print(md)


if __name__ == "__main__":
    main()
