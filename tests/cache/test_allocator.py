"""keep_freed_memory: large tensors allocated again and again, as a training step does, come to reuse the process's
pages (no page faults), where by default each allocation maps fresh pages."""

import subprocess
import sys

import pytest

from mlsae_cache.core.allocator import keep_freed_memory

SCRIPT = """
import resource, sys, torch
from mlsae_cache.core.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(16 * 2**20), torch.ones(3 * 2**20)  # 64 and 12 MiB, every page written
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print([faults() for _ in range(8)][-1])  # the heap settles after a few rounds
"""


def page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_freed_tensor_is_reused_without_page_faults() -> None:
    if not keep_freed_memory():
        pytest.skip("this C library has no mallopt (not glibc)")
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 10_000, f"76 MiB of fresh pages should fault about 19k times by default, got {default}"
    assert kept < default / 10, (kept, default)
