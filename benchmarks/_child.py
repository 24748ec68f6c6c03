"""One measurement in a fresh process (so that peak RSS belongs to that configuration alone).

Prints one JSON line. Used by ``efficiency.py`` and ``peers.py``; not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn, repeats: int, warmup: int = 1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {
        "latency_s": float(np.median(times)),
        "latency_min_s": float(np.min(times)),
        "latency_max_s": float(np.max(times)),
        "runs": len(times),
    }


# --- JAX (crd-jax) ----------------------------------------------------------------------------------------


def jax_arch(name: str) -> dict:
    from crd_jax.config import base_config
    from crd_jax.models import build as mbuild

    c = base_config().model
    if name == "vm_diff":
        c.diffeomorphic = True
    elif name == "vxmdense":  # voxelmorph 0.2 VxmDense / MONAI layout: stride-1 convs + max pooling
        c.encoder_pooling = "maxpool"
        c.decoder = ((32,), (32,), (32,), (32,), (32, 16, 16))
    elif name != "vm":
        raise ValueError(name)
    return mbuild.architecture(c)


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp

    from crd_jax.models import build as mbuild
    from crd_jax.ops import native
    from crd_jax.losses import registration_loss

    if args.conv == "lax":
        os.environ["CRD_JAX_FAST_CONV"] = "0"
    if args.bf16:
        sys.modules["crd_jax.ops.conv"].bf16_inference(True)
    base_rss = rss_mb()
    model = mbuild.registrar_from_config(jax_arch(args.model), args.factor)
    small = jnp.zeros((1, *(32 * args.factor,) * 3, 1))  # conv parameters do not depend on the image size
    params = model.init(jax.random.PRNGKey(0), small, small)
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    m = jnp.asarray(rng.random((1, *shape, 1), np.float32))
    f = jnp.asarray(rng.random((1, *shape, 1), np.float32))
    if args.mode == "infer":
        fn = jax.jit(lambda p, m, f: model.apply(p, m, f)["disp"])
    else:
        fn = jax.jit(jax.value_and_grad(lambda p, m, f: registration_loss(m, f, model.apply(p, m, f)["disp"])[0]))
    t = time.perf_counter()
    compiled = fn.lower(params, m, f).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    out = {
        "framework": "jax",
        "conv": "native" if native.available() and args.conv != "lax" else "lax",
        "compile_s": compile_s,
        "bf16": bool(args.bf16 and native.has_bf16()),
        "bf16_engine": native.bf16_engine() if args.bf16 else "",
    }
    if mem is not None:
        out.update(
            xla_arguments_mb=mem.argument_size_in_bytes / 2**20,
            xla_outputs_mb=mem.output_size_in_bytes / 2**20,
            xla_temporaries_mb=mem.temp_size_in_bytes / 2**20,
            xla_total_mb=(
                mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
            )
            / 2**20,
        )
    out.update(timed(lambda: jax.block_until_ready(compiled(params, m, f)), args.repeats))
    out["baseline_rss_mb"] = base_rss
    out["peak_rss_mb"] = rss_mb()
    if jax.default_backend() == "gpu":
        stats = jax.devices()[0].memory_stats() or {}
        out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    if args.flops:
        # XLA's count for the same model written with lax.conv (the native kernel is opaque to XLA).
        native._state["ok"] = False
        ref = jax.jit(fn.__wrapped__ if hasattr(fn, "__wrapped__") else fn)
        ref = (
            jax.jit(lambda p, m, f: model.apply(p, m, f)["disp"])
            if args.mode == "infer"
            else jax.jit(jax.value_and_grad(lambda p, m, f: registration_loss(m, f, model.apply(p, m, f)["disp"])[0]))
        )
        cost = ref.lower(params, m, f).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out["gflop"] = float(cost.get("flops", 0.0)) / 1e9
    return out


# --- PyTorch peers ----------------------------------------------------------------------------------------


def torch_same_arch(torch, nn):
    """crd-jax's VM (stride-2 convs, VoxelMorph-2 decoder) in PyTorch, for a like-with-like comparison."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.conv = nn.Conv3d(cin, cout, 3, stride, 1)
            self.act = nn.LeakyReLU(0.2)

        def forward(self, x):
            return self.act(self.conv(x))

    class VM(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList([Block(2, 16, 2), Block(16, 32, 2), Block(32, 32, 2), Block(32, 32, 2)])
            self.dec4 = Block(32, 32)
            self.dec3 = Block(64, 32)
            self.dec2 = Block(64, 32)
            self.dec1 = nn.Sequential(Block(48, 32), Block(32, 32))
            self.dec0 = nn.Sequential(Block(34, 16), Block(16, 16))
            self.flow = nn.Conv3d(16, 3, 3, 1, 1)

        def forward(self, moving, fixed):
            x = torch.cat([moving, fixed], 1)
            skips = [x]
            h = x
            for e in self.enc:
                h = e(h)
                skips.append(h)
            h = self.dec4(h)
            for level, dec in ((3, self.dec3), (2, self.dec2), (1, self.dec1), (0, self.dec0)):
                # to the skip's size, as crd-jax does: a level of odd size (the LL grid at OASIS size) upsamples
                # to one voxel less than twice its coarser neighbour
                up = nn.functional.interpolate(h, size=skips[level].shape[2:], mode="nearest")
                h = dec(torch.cat([up, skips[level]], 1))
            return self.flow(h)

    return VM()


def run_torch(args) -> dict:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    base_rss = rss_mb()
    shape = tuple(args.shape)
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    if args.factor != 1 and (args.model != "torch_same" or args.mode != "infer"):
        raise ValueError("only torch_same inference runs at a reduced resolution (the paper's L/LL)")
    if args.model == "torch_vxmdense":
        import inspect

        if not hasattr(inspect, "getargspec"):  # voxelmorph 0.2 predates Python 3.11
            inspect.getargspec = lambda f: inspect.getfullargspec(f)[:4]
        os.environ.setdefault("VXM_BACKEND", "pytorch")
        os.environ.setdefault("NEURITE_BACKEND", "pytorch")
        import voxelmorph as vxm

        net = vxm.networks.VxmDense(shape, [[16, 32, 32, 32], [32, 32, 32, 32, 32, 16, 16]], int_steps=0)
        forward = lambda m, f: net(m, f, registration=True)[1]  # noqa: E731
    elif args.model == "monai_voxelmorph":
        from monai.networks.nets import VoxelMorph, VoxelMorphUNet

        backbone = VoxelMorphUNet(
            spatial_dims=3, in_channels=2, unet_out_channels=32, channels=(16, 32, 32, 32, 32, 32), final_conv_channels=(16, 16)
        )
        net = VoxelMorph(backbone=backbone, integration_steps=0)
        forward = lambda m, f: net(m, f)[1]  # noqa: E731
    elif args.model == "torch_same":
        net = torch_same_arch(torch, nn)
        forward = net
        if args.factor != 1:  # the paper's L/LL: the network on inputs downsampled by n, the field upsampled, times n
            n = args.factor

            def forward(m, f, net=net, n=n):
                small = [F.interpolate(x, scale_factor=1 / n, mode="trilinear", align_corners=False) for x in (m, f)]
                return F.interpolate(net(*small), scale_factor=n, mode="trilinear", align_corners=False) * n
    else:
        raise ValueError(args.model)
    fmt = torch.channels_last_3d if args.memory_format == "channels_last_3d" else torch.contiguous_format
    net = net.to(device=device, memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    m = torch.rand((1, 1, *shape), generator=g).to(device=device, memory_format=fmt)
    f = torch.rand((1, 1, *shape), generator=g).to(device=device, memory_format=fmt)
    n_params = sum(p.numel() for p in net.parameters())
    if args.mode == "infer":
        net.eval()

        def step():
            # --bf16: autocast, PyTorch's own bfloat16 inference (oneDNN's bf16 convolutions, AMX where present)
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                forward(m, f)
            if device.type == "cuda":
                torch.cuda.synchronize()
    else:
        ones = torch.ones(1, 1, 9, 9, 9, device=device)

        def ncc(a, b):
            # voxelmorph 0.2's NCC (a dense 9^3 box convolution), without its hard-coded .to("cuda")
            sums = [F.conv3d(x, ones, padding=4) for x in (a, b, a * a, b * b, a * b)]
            a_sum, b_sum, aa, bb, ab = sums
            a_mean, b_mean = a_sum / 729, b_sum / 729
            cross = ab - b_mean * a_sum - a_mean * b_sum + a_mean * b_mean * 729
            a_var = aa - 2 * a_mean * a_sum + a_mean * a_mean * 729
            b_var = bb - 2 * b_mean * b_sum + b_mean * b_mean * 729
            return -torch.mean(cross * cross / (a_var * b_var + 1e-5))

        def grad(_, d):
            dd = [torch.diff(d, dim=k) ** 2 for k in (2, 3, 4)]
            return sum(torch.mean(x) for x in dd) / 3

        grid = [torch.arange(s, dtype=torch.float32, device=device) for s in shape]
        identity = torch.stack(torch.meshgrid(*grid, indexing="ij"))[None]

        def warp(image, disp):
            loc = identity + disp
            loc = torch.stack([2 * (loc[:, i] / (s - 1) - 0.5) for i, s in enumerate(shape)], -1)[..., [2, 1, 0]]
            return F.grid_sample(image, loc, align_corners=True, padding_mode="border")

        def step():
            net.zero_grad(set_to_none=True)
            disp = forward(m, f)
            loss = ncc(f, warp(m, disp)) + grad(None, disp)
            loss.backward()

    if args.bf16 and args.mode != "infer":
        raise ValueError("--bf16 is an inference setting")
    out = {
        "framework": "torch",
        "torch": torch.__version__,
        "memory_format": args.memory_format,
        "parameters": n_params,
        "device": str(device),
        "bf16": bool(args.bf16),
    }
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats()
    out.update(timed(step, args.repeats))
    if device.type == "cuda":
        out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["baseline_rss_mb"] = base_rss
    out["peak_rss_mb"] = rss_mb()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--factor", type=int, default=1)
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--shape", type=int, nargs=3, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--conv", choices=("native", "lax"), default="native")
    p.add_argument("--flops", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bfloat16 inference: crd-jax's opt-in convolutions, PyTorch's autocast")
    p.add_argument("--memory-format", default="channels_last_3d")
    p.add_argument("--device", default="cpu", help="PyTorch peers: cpu or cuda")
    args = p.parse_args()
    runner = run_torch if args.model.startswith(("torch", "monai")) else run_jax
    result = runner(args)
    result.update(model=args.model, factor=args.factor, mode=args.mode, shape=list(args.shape))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
