"""The malloc tuning applied at import (naqs_cli.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from naqs_cli import allocator

LINUX_GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc's mallopt only")
def test_applied_at_import_on_glibc():
    assert allocator.APPLIED is True


def _applied_in_child(switch: str, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_",)}
    env.update({allocator.ENV_SWITCH: switch}, **extra)
    code = "import naqs_cli.allocator as a; print(a.APPLIED)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_switched_off_by_the_environment():
    assert _applied_in_child("0") == "False"


@pytest.mark.skipif(not LINUX_GLIBC, reason="glibc's mallopt only")
def test_switched_on_by_default():
    assert _applied_in_child("1") == "True"


def test_an_explicit_glibc_threshold_is_left_alone():
    assert _applied_in_child("1", MALLOC_MMAP_THRESHOLD_="65536") == "False"
    assert _applied_in_child("1", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536") == "False"


THP = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")


def test_huge_page_advice_only_for_large_cpu_tensors(monkeypatch):
    import torch

    assert allocator.advise_huge_pages(torch.ones(1000)) is False  # from the heap: not advised
    large = torch.empty(allocator.HUGE_PAGE_MIN_BYTES // 4 + 12345)
    large.fill_(2.5)
    advised = allocator.advise_huge_pages(large)
    assert advised is (LINUX_GLIBC and THP)
    assert bool((large == 2.5).all())  # the contents are untouched
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.advise_huge_pages(large) is False
