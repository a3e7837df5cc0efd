"""The CPU's arithmetic peak from its microarchitecture (issue 33, item 4).

peak (GFLOP/s) = cores x GHz x FLOPs per cycle per core, where FLOPs per cycle = FMA units x lanes per unit x 2
(a fused multiply-add is 2 FLOPs). The unit count and width come from the microarchitecture, not from the ISA
flags: Zen 4 accepts AVX-512 but executes it on two 256-bit FMA pipes, so its fp32 peak is that of a 2x256-bit
AVX2 core, half of what "AVX-512 = 2 x 16 lanes" would say. bf16 (``VDPBF16PS``: two bf16 products summed into each
fp32 lane) doubles the FLOPs per unit where the ISA has it; AMX (``TDPBF16PS``) does 1024 bf16 multiply-adds per
cycle per core. Without a bf16 instruction bf16 peak = fp32 peak (the work runs in fp32).

The clock is the one seen while timing (:func:`measure_clock_ghz`: a chain of dependent integer adds, one per
cycle, timed on every core at once), not the nominal clock (under a hypervisor ``/proc/cpuinfo`` shows the host's
base/TSC clock; boost is not visible there). Without a C compiler it falls back to ``/proc/cpuinfo`` and says so.

    python -m bench.cpu_peak          # this CPU: microarchitecture, measured clock, peaks
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MICROARCHITECTURES", "Microarch", "identify", "peak_gflops", "measure_clock_ghz", "cpu_peak",
           "read_cpuinfo", "peak_line"]


@dataclass(frozen=True)
class Microarch:
    """FMA resources of one core: ``fma_units`` pipes of ``fma_bits`` each for fp32 (and bf16 dot products when
    ``bf16`` names the instruction), AMX tiles where ``amx_bf16_fma_per_cycle`` is set; ``source`` names the
    document the figures come from."""

    name: str
    fma_units: int
    fma_bits: int
    bf16: str | None  # "avx512_bf16" (VDPBF16PS on the FMA pipes), or None
    amx_bf16_fma_per_cycle: int = 0
    source: str = ""

    @property
    def fp32_flops_per_cycle(self) -> int:
        return self.fma_units * (self.fma_bits // 32) * 2

    @property
    def bf16_flops_per_cycle(self) -> int:
        if self.amx_bf16_fma_per_cycle:
            return 2 * self.amx_bf16_fma_per_cycle
        return 2 * self.fp32_flops_per_cycle if self.bf16 else self.fp32_flops_per_cycle


_AMD_Z4 = ("AMD, Software Optimization Guide for AMD Family 19h Processors (pub. 57647), Zen 4 FPU: two 256-bit "
           "FMA pipes, 512-bit ops issued as two 256-bit halves")
#: the table: microarchitecture key -> FMA resources, with the source of each line
MICROARCHITECTURES: dict[str, Microarch] = {
    "zen1": Microarch("AMD Zen / Zen+", 2, 128, None, source="AMD Software Optimization Guide for Family 17h "
                      "(pub. 55723): four 128-bit FP pipes, two of them FMA"),
    "zen2": Microarch("AMD Zen 2", 2, 256, None, source="AMD Software Optimization Guide for Family 17h Models 30h+ "
                      "(pub. 56305): two 256-bit FMA pipes"),
    "zen3": Microarch("AMD Zen 3", 2, 256, None, source="AMD Software Optimization Guide for Family 19h (pub. "
                      "56665): two 256-bit FMA pipes"),
    "zen4": Microarch("AMD Zen 4", 2, 256, "avx512_bf16", source=_AMD_Z4),
    "zen5": Microarch("AMD Zen 5", 2, 512, "avx512_bf16", source="AMD Software Optimization Guide for Family 1Ah "
                      "(pub. 58455): 512-bit datapath, two 512-bit FMA pipes (server / desktop parts)"),
    "intel_avx2": Microarch("Intel Haswell .. Skylake client / Alder Lake (AVX2)", 2, 256, None,
                            source="Intel 64 and IA-32 Architectures Optimization Reference Manual: two 256-bit "
                                   "FMA units (ports 0 and 1)"),
    "intel_avx512_client": Microarch("Intel Ice Lake / Tiger Lake client (AVX-512)", 1, 512, None,
                                     source="Intel Optimization Reference Manual: one 512-bit FMA (ports 0+1 fused)"),
    "intel_avx512_server": Microarch("Intel Skylake-SP / Cascade Lake / Ice Lake-SP (AVX-512)", 2, 512, None,
                                     source="Intel Optimization Reference Manual: two 512-bit FMA units (port 0+1 "
                                            "fused and port 5) on Xeon Gold 6xxx / Platinum; some 5xxx have one"),
    "intel_cooper_lake": Microarch("Intel Cooper Lake (AVX-512 BF16)", 2, 512, "avx512_bf16",
                                   source="Intel Optimization Reference Manual: two 512-bit FMA units, VDPBF16PS"),
    "intel_sapphire_rapids": Microarch("Intel Sapphire / Emerald / Granite Rapids (AMX)", 2, 512, "avx512_bf16", 1024,
                                       source="Intel Optimization Reference Manual, AMX chapter: TMUL 1024 bf16 "
                                              "multiply-adds per cycle per core; two 512-bit FMA units"),
}


def read_cpuinfo(text: str | None = None) -> dict:
    """``{"vendor", "family", "model", "model_name", "flags": set, "mhz": [per-CPU cpu MHz]}`` from
    ``/proc/cpuinfo`` (empty dict where it cannot be read)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {}
    info: dict = {"mhz": [], "flags": set()}
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        if k == "vendor_id":
            info.setdefault("vendor", v)
        elif k == "cpu family":
            info.setdefault("family", int(v))
        elif k == "model":
            info.setdefault("model", int(v))
        elif k == "model name":
            info.setdefault("model_name", v)
        elif k == "flags" and not info["flags"]:
            info["flags"] = set(v.split())
        elif k == "cpu MHz":
            info["mhz"].append(float(v))
    return info


_INTEL_SERVER_MODELS = {0x55, 0x6A, 0x6C}  # Skylake-SP / Cascade / Cooper Lake (0x55), Ice Lake-SP
_INTEL_AMX_MODELS = {0x8F, 0xCF, 0xAD, 0xAE}  # Sapphire / Emerald / Granite Rapids


def identify(info: dict) -> tuple[str, str]:
    """``(key of MICROARCHITECTURES, how it was identified)`` from :func:`read_cpuinfo`'s dict (vendor, family,
    model; the flags only where the model number does not decide)."""
    vendor, fam, model, flags = info.get("vendor"), info.get("family"), info.get("model"), info.get("flags", set())
    why = f"{vendor} family {fam:#x} model {model:#x}" if fam is not None and model is not None else str(vendor)
    if vendor == "AuthenticAMD" and fam is not None:
        if fam == 0x17:
            return ("zen2" if model >= 0x30 else "zen1"), why
        if fam == 0x19:
            zen4 = 0x10 <= model <= 0x1F or 0x60 <= model <= 0x7F or 0xA0 <= model <= 0xAF
            return ("zen4" if zen4 else "zen3"), why
        if fam >= 0x1A:
            return "zen5", why
    if vendor == "GenuineIntel":
        if "amx_bf16" in flags or model in _INTEL_AMX_MODELS:
            return "intel_sapphire_rapids", why
        if "avx512_bf16" in flags:
            return "intel_cooper_lake", why
        if "avx512f" in flags:
            return ("intel_avx512_server" if model in _INTEL_SERVER_MODELS else "intel_avx512_client"), why
    # unknown model: the narrowest reading of the flags (never overstate a peak)
    if "avx2" in flags or "fma" in flags:
        return ("zen4" if "avx512_bf16" in flags and vendor == "AuthenticAMD" else "intel_avx2"), why + " (from flags)"
    return "zen1", why + " (unknown; 2x128-bit assumed)"


def peak_gflops(arch: Microarch | str, cores: int, ghz: float) -> dict:
    """``{"fp32", "bf16"}`` GFLOP/s of ``cores`` cores at ``ghz``."""
    a = MICROARCHITECTURES[arch] if isinstance(arch, str) else arch
    return {"fp32": cores * ghz * a.fp32_flops_per_cycle, "bf16": cores * ghz * a.bf16_flops_per_cycle}


_PROBE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* argv[1] loop trips of 200 dependent adds per window, argv[2] windows; prints the fastest window's GHz */
int main(int argc, char **argv) {
    long n = atol(argv[1]), w = atol(argv[2]), x = 0; double best = 0; struct timespec a, b;
    for (long k = 0; k < w; k++) {
        clock_gettime(CLOCK_MONOTONIC, &a);
        for (long i = 0; i < n; i++) { __asm__ volatile(".rept 200\n\tadd $1, %0\n\t.endr" : "+r"(x)); }
        clock_gettime(CLOCK_MONOTONIC, &b);
        double s = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9, g = (double)n * 200 / s / 1e9;
        if (g > best) best = g;
    }
    printf("%.6f %ld\n", best, x);
    return 0;
}
"""


def _probe_binary() -> Path | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "glad-bench"
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        d = Path(tempfile.gettempdir())
    exe = d / "clock_probe2"
    if not exe.is_file():
        src = d / "clock_probe2.c"
        src.write_text(_PROBE_C)
        r = subprocess.run([cc, "-O1", "-o", str(exe), str(src)], capture_output=True, text=True)
        if r.returncode != 0:
            return None
    return exe


def measure_clock_ghz(cores: int, windows: int = 40, adds: int = 10_000_000) -> dict:
    """The core clock under load: ``cores`` processes at once, each timing ``windows`` windows of ``adds``
    dependent integer adds (1 cycle each on every x86 core since 2011; about 3 ms a window) and keeping its fastest
    window (another process taking the core only slows a window down); the clock is the slowest core's.
    ``{"ghz", "per_core": [...], "source"}``; falls back to ``/proc/cpuinfo``'s highest "cpu MHz" without a C
    compiler."""
    exe = _probe_binary()
    if exe is None:
        mhz = read_cpuinfo().get("mhz") or [0.0]
        return {"ghz": max(mhz) / 1000, "per_core": [], "source": "/proc/cpuinfo cpu MHz (no C compiler for the "
                                                                 "probe; under a hypervisor the nominal clock)"}
    procs = [subprocess.Popen([str(exe), str(max(1, adds // 200)), str(windows)], stdout=subprocess.PIPE, text=True)
             for _ in range(max(1, cores))]
    per_core = [float(p.communicate()[0].split()[0]) for p in procs]
    return {"ghz": min(per_core), "per_core": per_core,
            "source": f"dependent-add probe, {cores} core(s) at once, fastest of {windows} windows each"}


def cpu_peak(cores: int, ghz: float | None = None, clock: dict | None = None) -> dict:
    """This CPU's peak for ``cores`` cores: ``{"arch", "arch_name", "identified_by", "source", "cores", "ghz",
    "clock_source", "nominal_mhz", "fp32_flops_per_cycle", "bf16_flops_per_cycle", "fp32", "bf16", "isa",
    "model_name"}`` (GFLOP/s); the clock from ``clock`` (:func:`measure_clock_ghz`'s result), ``ghz``, or a fresh
    probe."""
    info = read_cpuinfo()
    key, why = identify(info)
    a = MICROARCHITECTURES[key]
    if ghz is None:
        clock = clock or measure_clock_ghz(cores)
        ghz = clock["ghz"]
    p = peak_gflops(a, cores, ghz)
    flags = info.get("flags", set())
    return {"arch": key, "arch_name": a.name, "identified_by": why, "source": a.source, "cores": cores, "ghz": ghz,
            "clock_source": (clock or {}).get("source", "given"), "clock_per_core": (clock or {}).get("per_core", []),
            "nominal_mhz": max(info.get("mhz") or [0.0]), "model_name": info.get("model_name", "unknown"),
            "fp32_flops_per_cycle": a.fp32_flops_per_cycle, "bf16_flops_per_cycle": a.bf16_flops_per_cycle,
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags], **p}


def peak_line(peak: dict) -> str:
    """One sentence for the tables: CPU, microarchitecture, clock and its source, peaks and their source."""
    return (f"CPU: {peak.get('model_name')} ({peak.get('identified_by')}; {' '.join(peak.get('isa', []))}) = "
            f"{peak.get('arch_name')}: {peak.get('fp32_flops_per_cycle')} fp32 / {peak.get('bf16_flops_per_cycle')} "
            f"bf16 FLOP/cycle/core ({peak.get('source')}). {peak.get('cores')} cores at {peak.get('ghz', 0):.2f} GHz "
            f"({peak.get('clock_source')}; /proc/cpuinfo says {peak.get('nominal_mhz', 0):.0f} MHz): peak fp32 "
            f"{peak.get('fp32', 0):.0f} GFLOP/s, bf16 {peak.get('bf16', 0):.0f} GFLOP/s.")


def main() -> None:
    from glad_runtime.core.cpus import usable_cores

    p = cpu_peak(usable_cores())
    print(peak_line(p))
    print(json.dumps({k: v for k, v in p.items()}, indent=1))


if __name__ == "__main__":
    main()
