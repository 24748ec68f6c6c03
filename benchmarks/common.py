"""Shared by the benchmark drivers: run one configuration in a fresh process, write JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def padded(shape: Sequence[int], multiple: int) -> List[int]:
    return [int(-(-s // multiple) * multiple) for s in shape]


def run_child(
    model: str,
    shape: Sequence[int],
    factor: int = 1,
    mode: str = "infer",
    repeats: int = 5,
    conv: str = "native",
    flops: bool = False,
    log=None,
    timeout: int = 3600,
    cpus: int = 0,
    extra: Sequence[str] = (),
) -> Dict:
    """One measurement in a fresh process; ``cpus > 0`` pins it to the first ``cpus`` CPUs it may use (XLA's
    pool and the native kernel's both size themselves by the affinity mask)."""
    cmd = [
        sys.executable,
        str(HERE / "_child.py"),
        "--model",
        model,
        "--factor",
        str(factor),
        "--mode",
        mode,
        "--shape",
        *map(str, shape),
        "--repeats",
        str(repeats),
        "--conv",
        conv,
    ]
    if flops:
        cmd.append("--flops")
    cmd += list(extra)
    pin = None
    if cpus > 0:
        allowed = sorted(os.sched_getaffinity(0))[:cpus]
        pin = lambda: os.sched_setaffinity(0, allowed)  # noqa: E731
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=pin)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        result = {
            "model": model,
            "factor": factor,
            "mode": mode,
            "shape": list(shape),
            "error": proc.stderr.strip().splitlines()[-1:],
        }
    else:
        result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - t
    if log:
        log(json.dumps({k: v for k, v in result.items() if not isinstance(v, list) or k == "shape"}))
    return result


def machine() -> Dict:
    import jax

    info = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "backend": jax.default_backend(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # malloc in huge pages or not (crd_jax/allocator.py)
    }
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def write(out: Path, payload: Dict, markdown: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def fmt_latency(r: Dict) -> str:
    if "error" in r:
        return "failed"
    return f"{r['latency_s']:.3f} ({r['latency_min_s']:.3f}-{r['latency_max_s']:.3f})"


def fmt(v: Optional[float], digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"
