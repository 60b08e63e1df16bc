"""The allocator setting score_docs applies on CPU (glibc's mallopt)."""

import platform

import pytest

from megatron_miniplm.scoring.memory import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are glibc's")
def test_glibc_accepts_the_thresholds():
    assert keep_freed_memory() is True
