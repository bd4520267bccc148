"""Memory figures come from psutil (the pool's default size, the memory check, kvx profile's RSS)."""

from __future__ import annotations

import psutil


def test_available_memory_is_psutils():
    from kvx.runtime.memory import _cpu_available
    from kvx.runtime.cache.pool import _meminfo_available

    want = psutil.virtual_memory().available
    for got in (_cpu_available(), _meminfo_available()):
        assert got is not None and abs(got - want) < 0.2 * want + (256 << 20)


def test_process_memory_reads_the_rss_and_its_peak():
    from kvx.runtime.profile import _process_memory

    rss, peak = _process_memory()
    now = psutil.Process().memory_info().rss
    assert rss is not None and abs(rss - now) < 0.2 * now + (64 << 20)
    assert peak is not None and peak >= 0.8 * rss
