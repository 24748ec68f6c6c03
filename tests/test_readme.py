"""The README's figures are the results files the project regenerates, never typed by hand."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme_tables  # noqa: E402


def test_every_results_block_in_the_readme_and_the_docs_equals_its_results_file():
    found = {}
    for page in readme_tables.pages(ROOT):
        for name, body in readme_tables.blocks(page.read_text()):
            found.setdefault(page.name, set()).add(name)
            assert body == readme_tables.result_text(name), (
                f"{page.relative_to(ROOT)}: block '{name}' differs from benchmarks/results/{name}.md "
                "(python benchmarks/readme_tables.py rewrites it)"
            )
    assert {"default_run", "register_options"} <= found["README.md"]
    assert {"efficiency", "peers", "cpu_peak", "register_e2e", "gpu_table_h200"} <= found["performance.md"]


def test_the_pages_the_script_keeps_are_the_readme_and_every_docs_page():
    pages = readme_tables.pages(ROOT)
    assert pages[0] == ROOT / "README.md" and set(pages[1:]) == set((ROOT / "docs").glob("*.md"))


def test_ci_runs_exactly_the_readme_test_command():
    """The contract: `.ci/run` is the README's second command, character for character."""
    import re

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Install and run the tests.*?```bash\n(.*?)\n```", readme, re.S).group(1)
    assert (
        command.startswith("python3 -m venv .venv")
        and "pytest" in command
        and "ruff check ." in command
        and "ruff format --check ." in command
    )
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == command, (ci[-1], command)


def test_the_check_catches_a_changed_figure(tmp_path):
    (tmp_path / "t.md").write_text("| VM-L | 0.606 |\n")
    text = "before\n<!-- results: t -->\n| VM-L | 0.619 |\n<!-- /results -->\nafter\n"
    fresh = readme_tables.render(text, tmp_path)
    assert "0.606" in fresh and "0.619" not in fresh and fresh.startswith("before\n") and fresh.endswith("after\n")
    assert readme_tables.blocks(fresh)[0][1] != readme_tables.blocks(text)[0][1]


def _walkthrough_commands(text: str):
    import re
    import shlex

    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", text, re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_register_your_own_images_walkthrough_runs_as_written(tmp_path):
    """The README's walkthrough, command for command, on two synthetic brains stored in different
    orientations (LPS at 1.2 x 1 x 1 mm, RAS at 1 mm) with only the shipped models."""
    import subprocess

    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from crd_jax import metrics
    from crd_jax.data import SyntheticConfig, make_subject

    cfg = SyntheticConfig(shape=(80, 96, 80))
    (img1, seg1), (img2, seg2) = make_subject(cfg, 0), make_subject(cfg, 1)
    # sub-01: x resampled to 1.2 mm and stored LPS (x and y reversed), intensities like a scanner's
    img1_lps = ndimage.zoom(img1, (1 / 1.2, 1, 1), order=1)[::-1, ::-1] * 800.0
    seg1_lps = ndimage.zoom(seg1, (1 / 1.2, 1, 1), order=0)[::-1, ::-1]
    lps = np.diag([-1.2, -1.0, 1.0, 1.0])
    lps[:3, 3] = [(img1_lps.shape[0] - 1) * 1.2, img1_lps.shape[1] - 1, 0]
    nib.save(nib.Nifti1Image(img1_lps.astype(np.float32), lps), tmp_path / "sub-01_T1w.nii.gz")
    nib.save(nib.Nifti1Image(img2.astype(np.float32) * 800.0, np.eye(4)), tmp_path / "sub-02_T1w.nii.gz")
    nib.save(nib.Nifti1Image(seg2.astype(np.int16), np.eye(4)), tmp_path / "sub-02_labels.nii.gz")

    logs = {}
    import shlex

    activate = Path(sys.prefix) / "bin" / "activate"  # the environment the README's install made (the test's own)
    for argv in _walkthrough_commands((ROOT / "README.md").read_text()):
        assert argv[0] == "crd-jax"
        if activate.exists():  # as the README says: a new shell, the environment activated, the line as written
            line = f"source {shlex.quote(str(activate))} && {shlex.join(argv)}"
            proc = subprocess.run(
                ["bash", "--noprofile", "--norc", "-c", line],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
            )
        else:
            proc = subprocess.run([sys.executable, "-m", "crd_jax", *argv[1:]], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        logs[argv[1]] = proc.stdout
    # the figure shows the registration the walkthrough made: drawn from the saved outputs, no model loaded
    assert "drawn from the saved registration in sub-02_to_sub-01 (no model loaded, nothing registered)" in logs["figure"]
    assert "intensities scaled to [0, 1] (minmax)" in logs["register"] and "instance optimisation: 50 steps" in logs["register"]
    print(f"walkthrough figure: {tmp_path / 'sub-02_to_sub-01' / 'overview.png'}")
    out = tmp_path / "sub-02_to_sub-01"
    for name in (
        "warped.nii.gz",
        "warped_seg.nii.gz",
        "disp.nii.gz",
        "jacobian.nii.gz",
        "affine.txt",
        "affine_itk.txt",
        "registration.json",
        "labels_smooth.nii.gz",
        "overview.png",
    ):
        assert (out / name).is_file(), name
    warped = nib.load(out / "warped_seg.nii.gz")
    assert warped.shape == img1_lps.shape and np.allclose(warped.affine, lps)
    labels = range(1, cfg.num_labels + 1)
    before = ndimage.zoom(seg2, (1 / 1.2, 1, 1), order=0)[::-1, ::-1]
    dice_before = np.nanmean(metrics.dice(before, seg1_lps, labels))
    dice_after = np.nanmean(metrics.dice(np.asarray(warped.dataobj), seg1_lps, labels))
    assert dice_after > dice_before + 0.02, (dice_before, dice_after)
