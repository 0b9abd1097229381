"""bfloat16 on CPUs: the bfloat16 instructions this CPU has, and the warning where ``--precision bf16`` is
asked of one without them.

CPUs with AVX512-BF16 or AMX (AMD Zen 4, Intel Sapphire Rapids and later) run bfloat16 matrix multiplies at
about twice float32's rate; on CPUs without them the GEMM libraries convert to float32 and back, and bf16 runs
at a fraction of float32's rate (``bench/precision.py``, ``bench/train_efficiency.py --dtype bf16``).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

BF16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16", "bf16")  # as /proc/cpuinfo names them (x86, x86, Arm)


def cpu_bf16_instructions(cpuinfo: str | None = None) -> list[str] | None:
    """The bfloat16 instructions of this CPU (of :data:`BF16_INSTRUCTIONS`) by Linux's ``/proc/cpuinfo`` (or
    ``cpuinfo``, its text); ``None`` where that does not say (another system)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = [
        line.partition(":")[2].split()
        for line in cpuinfo.splitlines()
        if line.split(":")[0].strip() in ("flags", "Features")
    ]
    if not flags:
        return None
    return [name for name in BF16_INSTRUCTIONS if name in flags[0]]


def warn_if_emulated(work: str, rate: str, bench: str) -> None:
    """Log a warning that ``--precision bf16`` slows ``work`` down on this CPU, to ``rate`` (a fraction of
    float32's rate, as ``bench`` measured it), where its ``/proc/cpuinfo`` lists no bfloat16 instructions;
    nothing where the CPU has them or ``/proc/cpuinfo`` does not say."""
    if cpu_bf16_instructions() != []:
        return
    log.warning(
        "--precision bf16 on a CPU without bfloat16 instructions (AVX512-BF16, AMX): %s runs at %s float32's "
        "rate on such CPUs (%s); --precision fp32 or auto is faster here",
        work,
        rate,
        bench,
    )
