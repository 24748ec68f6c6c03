"""crd_jax.allocator: which processes ask glibc's malloc for transparent huge pages, and the re-execution that does it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from crd_jax import allocator
from crd_jax.allocator import HUGE_PAGE_TUNABLE, huge_page_malloc_note, huge_page_tunables, thp_mode
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
    assert huge_page_malloc_note({}) == ""
    assert huge_page_malloc_note({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == ""
    assert HUGE_PAGE_TUNABLE in huge_page_malloc_note({"GLIBC_TUNABLES": "a=1:" + HUGE_PAGE_TUNABLE})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="execve of the interpreter: Linux")
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexec_runs_the_command_again_in_the_same_process_with_the_tunable(tmp_path, opt_out):
    """A fresh interpreter that calls it runs its command twice, same pid, the second time with the tunable
    (the kernel and the C library are stubbed as a supported machine, so the test runs on any Linux)."""
    script = tmp_path / "cmd.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import crd_jax.allocator as a
            a.glibc_version, a.thp_mode = (lambda: (2, 36)), (lambda: "madvise")
            print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:], flush=True)
            a.reexec_with_huge_page_malloc()
            print("ran", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), sys.argv[1:], flush=True)
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"
    if opt_out:
        env["CRD_JAX_HUGEPAGES"] = "0"
    else:
        env.pop("CRD_JAX_HUGEPAGES", None)
    proc = subprocess.run(
        [sys.executable, "-X", "utf8", str(script), "a b", "--c"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    pid = lines[0].split()[1]
    if opt_out:
        same = "glibc.malloc.arena_max=4 ['a b', '--c']"
        assert lines == [f"start {pid} {same}", f"ran {pid} {same}"]
    else:
        tunables = "glibc.malloc.arena_max=4:" + HUGE_PAGE_TUNABLE
        assert lines == [
            f"start {pid} glibc.malloc.arena_max=4 ['a b', '--c']",
            f"start {pid} {tunables} ['a b', '--c']",  # the same process, exec'd with the same arguments
            f"ran {pid} {tunables} ['a b', '--c']",
        ]


def test_the_subcommand_is_the_first_word_that_is_not_an_option():
    assert subcommand(["-v", "finetune", "--init-from", "x"]) == "finetune"
    assert subcommand(["register", "--fixed", "f"]) == "register"
    assert subcommand(["--version"]) is None
    assert "finetune" in TRAINING_SUBCOMMANDS and "register" not in TRAINING_SUBCOMMANDS
