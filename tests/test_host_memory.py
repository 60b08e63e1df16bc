"""Keeping freed host memory on the CPU (host_memory): against the kernel's page-fault
counter, and what each case says at start-up."""

import os
import subprocess
import sys
from platform import libc_ver

import pytest

from megatron_miniplm import host_memory

_FAULTS = """
import resource, sys, torch
from megatron_miniplm import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed()[0]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # kept, the heap grows until freed blocks fit the next (aligned) request
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
before = faults()
for _ in range(10):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # freed at once
print(faults() - before)
"""


def _without_heap_settings() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}


@pytest.mark.skipif(libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_kept_host_memory_is_not_faulted_in_again():
    """64 MiB tensors allocated and freed one after another: glibc's defaults map and unmap each
    one (16,384 page faults apiece, counted by the kernel); kept, once the heap has grown to
    hold them, they reuse its blocks."""
    counts = {how: int(subprocess.run([sys.executable, "-c", _FAULTS, how], env=_without_heap_settings(),
                                      capture_output=True, text=True, check=True).stdout.split()[-1])
              for how in ("default", "keep")}
    pages = 10 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert counts["default"] >= pages // 2, counts
    assert counts["keep"] < pages // 20, counts


def test_heap_settings_from_the_environment_are_kept(monkeypatch):
    for name, value in (("MALLOC_TRIM_THRESHOLD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=4096")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert host_memory.keep_freed.__wrapped__() == (False, "glibc's heap settings from the environment kept")


def test_what_each_case_says_and_does(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed", lambda: calls.append(1) or (True, "kept"))
    assert host_memory.apply(True, "cuda") is None and host_memory.apply(False, "cuda") is None
    assert host_memory.apply(False, "cpu") == "glibc's defaults (--no-keep-freed-memory)"
    assert not calls
    assert host_memory.apply(True, "cpu") == "kept" and calls == [1]


def test_config_modules_import_no_torch():
    """The config modules declare the setting from here (and a tool's flags come from them
    before any torch import)."""
    code = ("import glob, importlib, sys\n"
            "for path in glob.glob('megatron_miniplm/*/config.py'):\n"
            "    importlib.import_module(path[:-3].replace('/', '.'))\n"
            "assert 'torch' not in sys.modules, 'a config module imports torch'")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)
