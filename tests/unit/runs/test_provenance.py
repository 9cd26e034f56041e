"""Where a result came from: the hardware's file-name slug."""

from __future__ import annotations

from cwd_lightning.runs import provenance


def test_hardware_slug():
    assert provenance.slug("AMD EPYC, 2 cores, CPU") == "amd-epyc-2-cores-cpu"
    assert provenance.slug("NVIDIA H200") == "nvidia-h200"
    assert provenance.slug("Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz, 8 cores, CPU") == (
        "intel-xeon-gold-6148-cpu-2-40ghz-8-cores-cpu"
    )
