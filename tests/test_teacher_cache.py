"""S3's teacher cache (crd_jax/training/teacher_cache.py): the pair count it budgets for, the cached loss
against the loss that runs the teacher, and a whole train.py run with the cache on against one with it off."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crd_jax.data.pairs import train_pair
from crd_jax.training import distill, teacher_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, atlas, group", [(5, None, None), (4, 2, None), (6, None, 3), (6, 1, 3)])
def test_distinct_pairs_is_the_number_of_pairs_the_stream_draws(n, atlas, group):
    drawn = {train_pair(7, step, slot, n, atlas, group) for step in range(4000) for slot in range(2)}
    assert teacher_cache.distinct_pairs(n, atlas, group) == len(drawn)


class _Teacher:
    """A deterministic stand-in with the FST's output structure (a field on a grid and features by level)."""

    def apply(self, frozen, m, f):
        from crd_jax.models.output import ModelOutput

        d = jnp.tanh(frozen["w"] * (m - f))
        disp = jnp.concatenate([d, 2 * d], axis=-1)
        return ModelOutput(disp=disp, disp_low=disp, features={0: jnp.sin(frozen["w"] * m)})


class _Student:
    def apply(self, params, m, f):
        from crd_jax.models.output import ModelOutput

        disp = jnp.concatenate([params["a"] * (m - f), params["b"] * m], axis=-1)
        return ModelOutput(disp=disp, disp_low=disp, features={0: params["a"] * m})


def test_cached_loss_equals_the_loss_that_runs_the_teacher():
    from crd_jax.losses import Objective

    teacher, student = _Teacher(), _Student()
    frozen = {"w": jnp.float32(1.7)}
    params = {"a": jnp.float32(0.3), "b": jnp.float32(-0.2)}
    rng = np.random.default_rng(0)
    images = rng.random((3, 12, 10, 1), dtype=np.float32)
    terms = (distill.TERMS["deformation"](weight=1.0), distill.TERMS["feature"](weight=0.5))
    loss = distill.make_loss(student, teacher, terms, Objective(reg_weight=0.1, window=3))
    cache = teacher_cache.TeacherCache(teacher.apply, frozen, images[:1], images[:1]).open(teacher_cache.MemoryStore(), 3)
    pairs = [(0, 1), (2, 0)]
    batch = {"moving": images[[m for m, _ in pairs]], "fixed": images[[f for _, f in pairs]]}
    cached_batch = dict(batch)
    per_pair = [cache.leaves(p, batch["moving"][i : i + 1], batch["fixed"][i : i + 1]) for i, p in enumerate(pairs)]
    for i in range(cache.tree.num_leaves):
        cached_batch[distill.cached_key(i)] = np.concatenate([leaves[i] for leaves in per_pair])
    cached = loss.with_cached_teacher(cache.tree)
    (v0, aux0), g0 = jax.value_and_grad(loss, has_aux=True)(params, frozen, batch)
    (v1, aux1), g1 = jax.value_and_grad(cached, has_aux=True)(params, frozen, cached_batch)
    assert float(aux0["deformation"]) > 0 and float(aux0["feature"]) > 0  # the terms are live
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-7)
    # each pair's teacher ran once; a second request is served from memory
    assert cache.computed == 2 and len(cache) == 2
    assert all(np.array_equal(a, b) for a, b in zip(cache.leaves((0, 1), None, None), per_pair[0]))


class _HalfTeacher:
    """The FST's "half" output: phi^T on a coarse grid and ``disp = up(phi^T)``."""

    def apply(self, frozen, m, f):
        from crd_jax.models.output import ModelOutput
        from crd_jax.ops.spatial import upsample_field

        low = jnp.tanh(frozen["w"] * (m - f))[:, ::2, ::2]
        low = jnp.concatenate([low, 2 * low], axis=-1)
        return ModelOutput(disp=upsample_field(low, 2), disp_low=low, features={0: jnp.sin(frozen["w"] * m)})


class _LowStudent:
    def apply(self, params, m, f):
        from crd_jax.models.output import ModelOutput
        from crd_jax.ops.spatial import upsample_field

        low = jnp.concatenate([params["a"] * (m - f), params["b"] * m], axis=-1)[:, ::2, ::2]
        return ModelOutput(disp=upsample_field(low, 2), disp_low=low, features={0: params["a"] * m})


def test_an_upsampled_teacher_field_is_cached_coarse_and_eq_8_on_the_full_grid_runs_coarse(monkeypatch):
    """A "half" teacher's up(phi^T) is not stored (phi^T is, 1/4 of it in 2-D); eq. 8 on the full grid of it and
    the student's up(phi^S) runs on the coarse grid, cached or not, and equals the fine-grid term; the cache's
    choice is made once (a setting changed after it is built changes nothing it stores)."""
    from crd_jax.losses import Objective
    from crd_jax.ops import grad_l2

    calls = []
    coarse_mse = grad_l2.mse_of_upsampled
    monkeypatch.setattr(grad_l2, "mse_of_upsampled", lambda *a: calls.append(a[2]) or coarse_mse(*a))

    teacher, student = _HalfTeacher(), _LowStudent()
    frozen = {"w": jnp.float32(1.3)}
    params = {"a": jnp.float32(0.4), "b": jnp.float32(-0.3)}
    images = np.random.default_rng(1).random((3, 12, 10, 1), dtype=np.float32)
    terms = (distill.Deformation(weight=1.0, grid="full"), distill.TERMS["feature"](weight=0.5))
    loss = distill.make_loss(student, teacher, terms, Objective(reg_weight=0.1, window=3))
    cache = teacher_cache.TeacherCache(teacher.apply, frozen, images[:1], images[:1]).open(teacher_cache.MemoryStore(), 3)
    assert cache.disp_factor == 2 and sorted(s for s, _ in cache.shapes) == [(6, 5, 2), (12, 10, 1)]  # phi^T, F_0
    batch = {"moving": images[[0, 2]], "fixed": images[[1, 0]]}
    per_pair = [cache.leaves(p, batch["moving"][i : i + 1], batch["fixed"][i : i + 1]) for i, p in enumerate([(0, 1), (2, 0)])]
    cached_batch = dict(batch, **{distill.cached_key(i): np.concatenate([x[i] for x in per_pair]) for i in range(2)})
    cached = loss.with_cached_teacher(cache.tree, cache.disp_factor)
    run = lambda f, b: jax.jit(jax.value_and_grad(f, has_aux=True))(params, frozen, b)  # noqa: E731
    (v0, aux0), g0 = run(loss, batch)
    (v1, _), g1 = run(cached, cached_batch)
    assert calls == [2, 2]  # eq. 8 on the coarse grid, uncached and cached
    before = grad_l2.mse_coarse()
    try:
        grad_l2.mse_coarse(False)
        (vf, auxf), gf = run(distill.make_loss(student, teacher, terms, Objective(reg_weight=0.1, window=3)), batch)
        assert calls == [2, 2]
        late = cache.leaves((1, 2), images[1:2], images[2:3])  # traced now, as decided when the cache was built
        assert [x.shape[1:] for x in late] == [s for s, _ in cache.shapes]
    finally:
        grad_l2.mse_coarse(before)
    assert float(aux0["deformation"]) > 0
    np.testing.assert_allclose(float(aux0["deformation"]), float(auxf["deformation"]), rtol=1e-5)
    for v, g in ((v1, g1), (vf, gf)):
        np.testing.assert_allclose(v, v0, rtol=1e-5)
        for k in g0:
            np.testing.assert_allclose(g[k], g0[k], rtol=1e-4, atol=1e-7)


def _train(workdir, *overrides):
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"--config={ROOT / 'configs/synthetic_vm_2d.py'}",
        f"--config.workdir={workdir}",
        "--config.train.progress_bar=False",
        "--config.data.synthetic.shape=(32,32)",
        "--config.data.synthetic.train=4",
        "--config.data.synthetic.val=0",
        "--config.data.synthetic.test=0",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.batch_size=2",
        "--config.eval.diagnostics=False",
        "--config.pipeline=('vm_h','vm_l','coop','fst','vm_l_crd')",
        "--config.stages.vm_h.steps=1",
        "--config.stages.vm_l.steps=1",
        "--config.stages.coop.steps=1",
        "--config.stages.fst.steps=1",
        "--config.stages.vm_l_crd.steps=20",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_a_run_with_the_teacher_cache_trains_the_same_student(tmp_path):
    from crd_jax.model_io import load_model

    on = _train(tmp_path / "on")
    off = _train(tmp_path / "off", "--config.train.teacher_cache_gb=0")
    assert "[vm_l_crd] teacher cache on: the frozen teacher runs once per pair (12 pairs" in on.stderr
    assert "[vm_l_crd] teacher cache off (train.teacher_cache_gb = 0)" in off.stderr

    def losses(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r.get("stage") == "vm_l_crd" and "loss" in r}

    l_on, l_off = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert sorted(l_on) == sorted(l_off) == list(range(1, 21))
    for step in l_off:
        assert l_on[step] == pytest.approx(l_off[step], rel=1e-4, abs=1e-6)
    p_on, _ = load_model(tmp_path / "on" / "stages" / "vm_l_crd" / "model")
    p_off, _ = load_model(tmp_path / "off" / "stages" / "vm_l_crd" / "model")
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_on, p_off)


class _Images:
    def __init__(self, n, shape):
        self.arrays = np.random.default_rng(1).random((n, *shape), dtype=np.float32)

    def __len__(self):
        return len(self.arrays)

    def image(self, i):
        return self.arrays[i]


def test_the_cache_is_used_only_when_exact_and_within_the_budget():
    from crd_jax.data.augment import Augment
    from crd_jax.data.loader import PairLoader

    teacher = _Teacher()
    frozen = {"w": jnp.float32(1.3)}
    loss = distill.make_loss(_Student(), teacher, (distill.TERMS["deformation"](weight=1.0),))
    loader = PairLoader(_Images(5, (12, 10)), global_batch=2, seed=3)
    example = loader.batch(0)
    caches = {}
    cached, cached_loader, why = teacher_cache.attach(loss, frozen, loader, example, 1.0, caches)
    pair_mb = (2 * 12 * 10 * 2 + 12 * 10) * 4 / 2**20  # disp, disp_low (2 channels each), one feature level
    assert why.startswith(f"teacher cache on: the frozen teacher runs once per pair (20 pairs x {pair_mb:.1f} MB in host memory")
    batch = cached_loader.batch(4)
    (m0, f0), (m1, f1) = loader.pairs(4)
    expected = teacher.apply(frozen, batch["moving"], batch["fixed"])
    np.testing.assert_allclose(batch[distill.cached_key(0)], expected.disp, rtol=1e-6)
    assert cached.teacher_tree is not None and len(caches) == 1
    # a second stage with the same teacher and parameters shares the cache
    _, _, again = teacher_cache.attach(loss, frozen, loader, example, 1.0, caches)
    assert len(caches) == 1 and again.endswith(f"{len(next(iter(caches.values())))} already computed)")
    # off: budget 0, too small a budget, augmented pairs, a loss that is not S3's
    assert teacher_cache.attach(loss, frozen, loader, example, 0.0, {})[1] is loader
    small = teacher_cache.attach(loss, frozen, loader, example, 1e-6, {})
    assert small[1] is loader and small[2].startswith("teacher cache off: 20 pairs x")
    assert small[2].endswith("> train.teacher_cache_gb = 1e-06")
    augmented = loader.for_stage(augment=Augment("bspline", 8.0, 2.0))
    off = teacher_cache.attach(loss, frozen, augmented, example, 1.0, {})
    assert off[1] is augmented and off[2] == "teacher cache off: augmented pairs differ at every draw"
    assert teacher_cache.attach(lambda p, f, b: 0.0, frozen, loader, example, 1.0, {})[2] is None


def test_the_disk_cache_survives_a_restart_and_is_emptied_for_another_teacher(tmp_path):
    from crd_jax.data.loader import PairLoader

    teacher = _Teacher()
    loss = distill.make_loss(_Student(), teacher, (distill.TERMS["deformation"](weight=1.0),))
    loader = PairLoader(_Images(4, (12, 10)), global_batch=2, seed=5)
    example = loader.batch(0)
    folder = tmp_path / "teacher_cache" / "fst"

    def run(frozen, steps):
        _, cached_loader, why = teacher_cache.attach(loss, frozen, loader, example, 1e-6, {}, 1.0, folder)
        batches = [cached_loader.batch(step) for step in steps]
        return cached_loader.cache, batches, why

    frozen = {"w": jnp.float32(0.9)}
    first, batches, why = run(frozen, range(3))
    assert "in disk; 0 already computed" in why and first.computed == len({p for s in range(3) for p in loader.pairs(s)})
    for b in batches:  # the cached leaves are the teacher's outputs for the batch
        expected = teacher.apply(frozen, b["moving"], b["fixed"])
        np.testing.assert_allclose(b[distill.cached_key(0)], expected.disp, rtol=1e-6)
    # a new process (here: a new cache object) reads what the first computed, and computes nothing for it
    again, batches2, why = run(frozen, range(3))
    assert f"{len(first)} already computed" in why and again.computed == 0
    for b1, b2 in zip(batches, batches2):
        for key in b1:
            np.testing.assert_array_equal(b1[key], b2[key])
    # a pair whose 'filled' byte was never set (the process was killed while writing it) is computed again
    (store_dir,) = folder.parent.glob("fst-*")  # one folder per teacher setting
    filled = np.load(store_dir / "filled.npy", mmap_mode="r+")
    index = int(np.flatnonzero(filled)[0])
    filled[index] = 0
    filled.flush()
    del filled
    third, _, _ = run(frozen, range(3))
    assert third.computed == 1
    # other teacher parameters: the folder is emptied and filled again
    other, batches3, why = run({"w": jnp.float32(1.1)}, range(1))
    assert "0 already computed" in why and other.computed == len(set(loader.pairs(0)))
    assert not np.allclose(batches3[0][distill.cached_key(0)], batches[0][distill.cached_key(0)])
    # a disk budget too small, or a memory budget that fits, decide the store
    assert "teacher_cache_disk_gb = 1e-06" in teacher_cache.attach(loss, frozen, loader, example, 1e-6, {}, 1e-6, folder)[2]
    assert "in host memory" in teacher_cache.attach(loss, frozen, loader, example, 1.0, {}, 1.0, folder)[2]


def test_the_fingerprint_records_bfloat16_inference_and_keeps_float32_runs_fingerprints(monkeypatch):
    """A cache filled by a teacher whose convolutions rounded to bfloat16 (the process's bf16 inference on, an
    engine on the CPU) must not serve a float32 run, nor the reverse; float32 runs keep their old fingerprint, so
    the caches on disk of runs made before stay valid."""
    import importlib

    from crd_jax.ops import native

    conv = importlib.import_module("crd_jax.ops.conv")  # the module (crd_jax.ops.conv is also a function's name)
    teacher, frozen = _Teacher(), {"w": jnp.float32(0.9)}
    images = _Images(3, (8, 6))
    before = conv.bf16_inference()
    try:
        conv.bf16_inference(False)
        f32 = teacher_cache.fingerprint(teacher, frozen, images)
        assert teacher_cache.teacher_precision() == ""
        # what it was before the precision was recorded: the same hash without it
        import hashlib

        h = hashlib.sha256()
        h.update(repr(teacher).encode() + b"\0" + teacher_cache.teacher_code().encode())
        for leaf in jax.tree_util.tree_leaves(frozen):
            a = np.ascontiguousarray(jax.device_get(leaf))
            h.update(f"{a.dtype}{a.shape}".encode() + a.tobytes())
        h.update(f"{len(images)}".encode())
        for i in range(len(images)):
            h.update(np.ascontiguousarray(images.image(i), np.float32).tobytes())
        assert f32 == h.hexdigest()
        conv.bf16_inference(True)
        for engine, expected_same in (("", True), ("avx512-bf16", False), ("amx", False)):
            monkeypatch.setattr(native, "bf16_engine", lambda engine=engine: engine)
            got = teacher_cache.fingerprint(teacher, frozen, images)
            assert (got == f32) is expected_same, engine
        monkeypatch.setattr(native, "bf16_engine", lambda: "amx")
        amx = teacher_cache.fingerprint(teacher, frozen, images)
        monkeypatch.setattr(native, "bf16_engine", lambda: "avx512-bf16")
        assert teacher_cache.fingerprint(teacher, frozen, images) != amx  # another engine, another rounding
    finally:
        conv.bf16_inference(before)


def test_a_filled_disk_cache_stays_on_when_the_disk_has_filled_up_since(tmp_path, monkeypatch):
    """The free-space check counts what the cache's folder already holds: a resumed run on a disk that filled up
    after the cache was written reads the cache instead of switching it off (and the teacher running every
    step); without a folder the same free space still switches it off."""
    import collections

    from crd_jax.data.loader import PairLoader

    teacher = _Teacher()
    loss = distill.make_loss(_Student(), teacher, (distill.TERMS["deformation"](weight=1.0),))
    loader = PairLoader(_Images(3, (12, 10)), global_batch=2, seed=5)
    example = loader.batch(0)
    folder = tmp_path / "teacher_cache" / "fst"
    frozen = {"w": jnp.float32(0.9)}
    _, cached_loader, why = teacher_cache.attach(loss, frozen, loader, example, 1e-6, {}, 1.0, folder)
    assert "in disk" in why
    total = teacher_cache.distinct_pairs(3)
    step = 0
    while len(cached_loader.cache) < total and step < 500:  # every pair the stream draws, written
        cached_loader.batch(step)
        step += 1
    assert len(cached_loader.cache) == total
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: usage(10**12, 10**12, 0))  # a full disk
    _, _, why = teacher_cache.attach(loss, frozen, loader, example, 1e-6, {}, 1.0, folder)
    assert f"{total} already computed" in why
    _, _, why = teacher_cache.attach(loss, frozen, loader, example, 1e-6, {}, 1.0, tmp_path / "elsewhere" / "fst")
    assert why.startswith("teacher cache off:") and "GB free on the disk" in why


class _Scaled(_Teacher):
    """The same parameters, another setting: its outputs differ, so no cache may serve the other's."""

    def __init__(self, scale):
        self.scale = scale

    def __repr__(self):
        return f"_Scaled(scale={self.scale})"

    def apply(self, frozen, m, f):
        out = super().apply(frozen, m, f)
        return out.replace(disp=self.scale * out.disp)


def test_caches_are_keyed_by_the_teachers_settings_and_share_one_memory_budget(tmp_path):
    from crd_jax.data.loader import PairLoader

    frozen = {"w": jnp.float32(0.9)}
    loader = PairLoader(_Images(4, (12, 10)), global_batch=2, seed=5)
    example = loader.batch(0)
    terms = (distill.TERMS["deformation"](weight=1.0),)
    one, three = (distill.make_loss(_Student(), _Scaled(s), terms) for s in (1.0, 3.0))
    folder = tmp_path / "teacher_cache" / "fst"
    # on disk: the same stage name and parameters but another setting reads nothing of the first's outputs
    _, first, _ = teacher_cache.attach(one, frozen, loader, example, 0.0, {}, 1.0, folder, "fst")
    first.batch(0)
    _, second, why = teacher_cache.attach(three, frozen, loader, example, 0.0, {}, 1.0, folder, "fst")
    assert "0 already computed" in why
    b = second.batch(0)
    np.testing.assert_allclose(b[distill.cached_key(0)], _Scaled(3.0).apply(frozen, b["moving"], b["fixed"]).disp, rtol=1e-6)
    assert len(list(folder.parent.glob("fst-*"))) == 2
    # in memory: one budget over every live cache; a second teacher that does not fit with the first is refused
    pair_bytes = (2 * 12 * 10 * 2 + 12 * 10) * 4
    budget = 12 * pair_bytes * 1.5 / 2**30  # room for one teacher's 12 pairs, not two
    caches = {}
    assert "host memory" in teacher_cache.attach(one, frozen, loader, example, budget, caches, teacher_stage="a")[2]
    refused = teacher_cache.attach(three, frozen, loader, example, budget, caches, teacher_stage="b")[2]
    assert refused.startswith("teacher cache off:") and "held by other teachers' caches" in refused
    # a stage with the first teacher again shares its cache; once no later stage needs it, it is dropped
    assert (
        len(caches) == 1
        and "host memory" in teacher_cache.attach(one, frozen, loader, example, budget, caches, teacher_stage="a")[2]
    )
    teacher_cache.release_unused(caches, ["b"])
    assert caches == {}
    assert "host memory" in teacher_cache.attach(three, frozen, loader, example, budget, caches, teacher_stage="b")[2]
