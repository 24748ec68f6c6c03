"""crd_jax.allocator: which processes ask glibc's malloc for transparent huge pages, and the re-execution that does it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crd_jax import allocator
from crd_jax.allocator import HUGE_PAGE_TUNABLE, huge_page_malloc_note, huge_page_tunables, started_as, thp_mode
from crd_jax.cli.main import TRAINING_SUBCOMMANDS, subcommand

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "environ, glibc, thp, expected",
    [
        ({}, (2, 36), "madvise", HUGE_PAGE_TUNABLE),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "madvise", "glibc.malloc.arena_max=2:" + HUGE_PAGE_TUNABLE),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # the user's choice stands
        ({"GLIBC_TUNABLES": HUGE_PAGE_TUNABLE}, (2, 36), "madvise", None),  # what stops a second exec
        ({"CRD_JAX_HUGEPAGES": "0"}, (2, 36), "madvise", None),
        ({"CRD_JAX_HUGEPAGES": "1"}, (2, 36), "madvise", HUGE_PAGE_TUNABLE),
        ({}, (2, 34), "madvise", None),  # the tunable arrived in glibc 2.35
        ({}, (3, 0), "madvise", HUGE_PAGE_TUNABLE),
        ({}, None, "madvise", None),  # musl, macOS, Windows
        ({}, (2, 36), "always", None),  # the kernel already backs large mappings with huge pages
        ({}, (2, 36), "never", None),
        ({}, (2, 36), None, None),
    ],
)
def test_huge_page_tunables_decides_from_the_environment_the_c_library_and_the_kernel(environ, glibc, thp, expected):
    assert huge_page_tunables(environ, glibc, thp) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]", "never"),
        ("", None),
    ],
)
def test_thp_mode_reads_the_bracketed_word(tmp_path, text, expected):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert thp_mode(str(path)) == expected
    assert thp_mode(str(tmp_path / "missing")) is None


def test_glibc_version_is_read_from_the_running_c_library():
    version = allocator.glibc_version()
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") and sys.platform.startswith("linux") else ""
    if not libc.startswith("glibc "):
        assert version is None
    else:
        assert version == tuple(int(p) for p in libc.split()[1].split(".")[:2])


def test_the_log_note_names_the_tunable_only_when_it_is_set():
    assert allocator.training_runs_in_huge_pages({"GLIBC_TUNABLES": HUGE_PAGE_TUNABLE})
    assert not allocator.training_runs_in_huge_pages({"CRD_JAX_HUGEPAGES": "0"})
    assert huge_page_malloc_note({}) == ""
    assert huge_page_malloc_note({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == ""
    assert HUGE_PAGE_TUNABLE in huge_page_malloc_note({"GLIBC_TUNABLES": "a=1:" + HUGE_PAGE_TUNABLE})


#: a command that reports itself before and after asking for the re-execution; the kernel and the C library are
#: stubbed as a supported machine, so the tests run on any Linux. ``STRIP=1`` drops GLIBC_TUNABLES at start, as
#: the loader does under secure execution.
COMMAND = """
import os, sys
if os.environ.get("STRIP") == "1":
    os.environ.pop("GLIBC_TUNABLES", None)
import crd_jax.allocator as a
a.glibc_version, a.thp_mode = (lambda: (2, 36)), (lambda: "madvise")
def report(what):
    print(what, os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:], sys.flags.utf8_mode, flush=True)
report("start")
a.reexec_with_huge_page_malloc((__file__,))
report("ran")
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="execve of the interpreter: Linux")


def _run(argv, tmp_path, **env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CRD_JAX_HUGEPAGES", allocator.REEXEC_MARK)}
    env.update(GLIBC_TUNABLES="glibc.malloc.arena_max=4", **env_changes)
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


@linux_only
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexec_runs_the_command_again_in_the_same_process_with_the_tunable(tmp_path, opt_out):
    """The command runs twice, same pid, interpreter options (-X utf8) and arguments, the second time with the
    tunable; ``CRD_JAX_HUGEPAGES=0`` leaves it alone."""
    (tmp_path / "cmd.py").write_text(COMMAND)
    argv = [sys.executable, "-X", "utf8", "cmd.py", "a b", "--c"]
    lines = _run(argv, tmp_path, **({"CRD_JAX_HUGEPAGES": "0"} if opt_out else {}))
    pid = lines[0].split()[1]
    before = f"{pid} glibc.malloc.arena_max=4 ['a b', '--c'] 1"
    if opt_out:
        assert lines == [f"start {before}", f"ran {before}"]
    else:
        after = f"{pid} glibc.malloc.arena_max=4:{HUGE_PAGE_TUNABLE} ['a b', '--c'] 1"
        assert lines == [f"start {before}", f"start {after}", f"ran {after}"]


@linux_only
def test_reexec_happens_once_where_the_loader_strips_the_tunable(tmp_path):
    """Secure execution drops GLIBC_TUNABLES from the new process: the pid mark still stops a second exec."""
    (tmp_path / "cmd.py").write_text(COMMAND)
    lines = _run([sys.executable, "cmd.py"], tmp_path, STRIP="1")
    pid = lines[0].split()[1]
    assert lines == [f"start {pid} - [] 0", f"start {pid} - [] 0", f"ran {pid} - [] 0"]


@linux_only
def test_code_run_inside_another_program_is_never_restarted(tmp_path):
    """runpy (as IPython's %run does) and a wrapper that sets sys.argv: the host's command line is not the
    command's, and an exec would run the host again from its start."""
    (tmp_path / "cmd.py").write_text(COMMAND)
    (tmp_path / "host.py").write_text(
        "import runpy, sys\nprint('host', flush=True)\nrunpy.run_path('cmd.py', run_name='__main__')\n"
        "sys.argv = ['crd-jax', 'finetune']\nfrom crd_jax.cli import main\n"
        "import crd_jax.allocator as a\na.glibc_version, a.thp_mode = (lambda: (2, 36)), (lambda: 'madvise')\n"
        "a.reexec_with_huge_page_malloc(('crd-jax',))\nprint('host end', flush=True)\n"
    )
    lines = _run([sys.executable, "host.py", "x"], tmp_path)
    assert [line.split()[0] for line in lines] == ["host", "start", "ran", "host"]  # each once; "host end" last


def test_started_as_matches_the_interpreter_command_line_to_the_command():
    py = "/usr/bin/python3"
    assert started_as(["/r/train.py"], ["/r/train.py", "--a=1"], [py, "-X", "utf8", "/r/train.py", "--a=1"])
    assert started_as(["crd-jax"], ["/venv/bin/crd-jax", "finetune"], [py, "/venv/bin/crd-jax", "finetune"])
    main = str(ROOT / "crd_jax" / "__main__.py")
    assert started_as(["crd-jax", main], [main, "finetune", "x"], [py, "-m", "crd_jax", "finetune", "x"])
    assert not started_as(["crd-jax"], ["crd-jax", "finetune"], [py, "host.py"])  # a wrapper set sys.argv
    assert not started_as(["/r/train.py"], ["host.py"], [py, "host.py"])  # runpy of train.py inside host.py
    assert not started_as(["crd-jax"], ["/venv/bin/crd-jax", "finetune"], [py, "/venv/bin/crd-jax", "register"])
    assert not started_as(["crd-jax"], [], [py])


def test_the_subcommand_is_the_first_word_that_is_not_an_option():
    assert subcommand(["finetune", "--init-from", "x"]) == "finetune"
    assert subcommand(["register", "--fixed", "f"]) == "register"
    assert subcommand(["--version"]) is None
    assert "finetune" in TRAINING_SUBCOMMANDS and "register" not in TRAINING_SUBCOMMANDS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="getrusage faults and glibc tunables: Linux")
def test_the_malloc_benchmark_runs_two_configurations_in_fresh_processes(tmp_path):
    out = tmp_path / "hp"
    cmd = [sys.executable, "benchmarks/huge_page_malloc.py", "--shape", "16", "16", "16", "--stages", "vm_l"]
    cmd += ["--rounds", "1", "--steps", "2", "--compare", "A", "C", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    a, c = payload["stages"]["vm_l"]["A"][0], payload["stages"]["vm_l"]["C"][0]
    # each child ran as configured: C is the training commands' huge pages and the blocks-kept tunables
    keep = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
    assert a["glibc_tunables"] == "" and c["glibc_tunables"] == f"{HUGE_PAGE_TUNABLE}:{keep}"
    assert all(r["median_s"] > 0 and r["faults_per_step"] >= 0 and r["max_rss_mb"] > 0 for r in (a, c))
    text = out.with_suffix(".md").read_text()
    assert "| VM-L |" in text and "A (glibc's defaults) against C (huge pages + large freed blocks kept" in text
    # B, the default comparison's other side, is what the training commands ask for; A B writes huge_page_malloc
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import huge_page_malloc
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert huge_page_malloc.CONFIGS["B"] == HUGE_PAGE_TUNABLE
    assert huge_page_malloc.OUTPUTS[("A", "B")] == "huge_page_malloc" and huge_page_malloc.CONFIGS["A"] is None
