"""Pure tests of the benchmark helpers: interleaved timing (order, warm-up, statistics) and the CPU peak table."""

from __future__ import annotations

import pytest

from bench.cpu_peak import MICROARCHITECTURES, identify, peak_gflops, read_cpuinfo
from bench.interleave import (
    cell_stats,
    format_cell,
    interleave,
    paired_ratio,
    round_order,
)


class FakeClock:
    """Advances by the duration the last called option set (seconds)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _options(log, clock, durations):
    def make(name):
        def fn():
            log.append(name)
            clock.now += durations[name].pop(0)
            return name
        return fn
    return {n: make(n) for n in durations}


def test_interleave_alternates_options_within_each_repeat_after_the_warmup():
    clock, log = FakeClock(), []
    durations = {"A": [9.0, 1, 2, 3], "B": [9.0, 10, 20, 30], "C": [9.0, 5, 5, 5]}
    res = interleave(_options(log, clock, durations), repeats=3, warmup=1, clock=clock)
    assert log == ["A", "B", "C"] + ["A", "B", "C"] * 3  # warm-up round, then A B C A B C A B C
    assert res["order"] == ["A", "B", "C"] * 3  # recorded calls only
    assert res["cells"]["A"]["values"] == [1, 2, 3]  # the warm-up's 9 s are not recorded
    assert res["last"] == {"A": "A", "B": "B", "C": "C"}


def test_interleave_rotates_and_uses_warmup_functions():
    clock, log = FakeClock(), []
    durations = {"A": [1, 1, 1, 1], "B": [1, 1, 1], "C": [1, 1, 1, 1]}
    calls = []
    res = interleave(_options(log, clock, durations), repeats=3, warmup=1, rotate=True, clock=clock,
                     warmups={"B": lambda: log.append("b-warm")}, between=calls.append)
    assert log == ["A", "b-warm", "C", "A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert res["order"] == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert calls == ["A", "B", "C"] + res["order"]  # `between` before every call, warm-up included
    assert round_order("ABC", 4, rotate=True) == ["B", "C", "A"] and round_order("ABC", 4) == ["A", "B", "C"]


def test_cell_statistics_median_spread_and_paired_ratio():
    clock, log = FakeClock(), []
    durations = {"ref": [0, 2.0, 4.0, 3.0, 10.0], "new": [0, 1.0, 2.0, 1.0, 4.0]}
    res = interleave(_options(log, clock, durations), repeats=4, warmup=1, clock=clock)
    ref = res["cells"]["ref"]
    assert ref["median"] == 3.5 and ref["min"] == 2.0 and ref["max"] == 10.0 and ref["n"] == 4
    assert ref["spread"] == pytest.approx((10.0 - 2.0) / 3.5)
    pr = paired_ratio(res, "ref", "new")  # per round: 2, 2, 3, 2.5
    assert pr["median"] == pytest.approx(2.25) and pr["min"] == 2.0 and pr["max"] == 3.0
    assert pr["of_medians"] == pytest.approx(3.5 / 1.5)
    assert cell_stats([5.0])["spread"] == 0.0
    assert format_cell(cell_stats([0.001, 0.002, 0.003]), scale=1e3) == "2.0 (1.0-3.0)"
    with pytest.raises(ValueError):
        interleave({}, repeats=1)
    with pytest.raises(ValueError):
        interleave({"A": lambda: None}, repeats=0)


@pytest.mark.parametrize("key, fp32, bf16", [
    ("zen4", 2 * 8 * 2, 2 * 2 * 8 * 2),      # AVX-512 on 2x256-bit FMA pipes: 32 fp32 FLOP/cycle, not 64
    ("zen3", 2 * 8 * 2, 2 * 8 * 2),          # AVX2 2x256-bit, no bf16 instruction: bf16 runs at the fp32 rate
    ("zen2", 32, 32),
    ("zen5", 2 * 16 * 2, 2 * 2 * 16 * 2),
    ("intel_avx2", 32, 32),                  # Skylake client: 2x256-bit
    ("intel_avx512_server", 2 * 16 * 2, 64),  # Skylake-SP / Ice Lake-SP: 2x512-bit
    ("intel_sapphire_rapids", 64, 2 * 1024),  # AMX: 1024 bf16 multiply-adds per cycle
])
def test_peak_table_flops_per_cycle(key, fp32, bf16):
    a = MICROARCHITECTURES[key]
    assert (a.fp32_flops_per_cycle, a.bf16_flops_per_cycle) == (fp32, bf16)
    assert a.source  # every line names its source
    p = peak_gflops(key, cores=2, ghz=3.0)
    assert p == {"fp32": 2 * 3.0 * fp32, "bf16": 2 * 3.0 * bf16}


def _cpuinfo(vendor, family, model, flags):
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"model name\t: X\ncpu MHz\t\t: 2596.142\nflags\t\t: {flags}\n")


@pytest.mark.parametrize("vendor, family, model, flags, key", [
    ("AuthenticAMD", 25, 17, "fma avx2 avx512f avx512_bf16", "zen4"),   # EPYC Genoa (this machine)
    ("AuthenticAMD", 25, 1, "fma avx2", "zen3"),                         # EPYC Milan
    ("AuthenticAMD", 23, 49, "fma avx2", "zen2"),                        # EPYC Rome
    ("GenuineIntel", 6, 143, "fma avx2 avx512f avx512_bf16 amx_bf16", "intel_sapphire_rapids"),
    ("GenuineIntel", 6, 106, "fma avx2 avx512f", "intel_avx512_server"),  # Ice Lake-SP
    ("GenuineIntel", 6, 158, "fma avx2", "intel_avx2"),                  # Coffee Lake (Skylake client core)
])
def test_identify_microarchitecture_from_cpuinfo(vendor, family, model, flags, key):
    info = read_cpuinfo(_cpuinfo(vendor, family, model, flags))
    assert info["mhz"] == [2596.142] and info["family"] == family
    assert identify(info)[0] == key


def test_cpu_share_fall_is_taken_per_round_from_seconds():
    from bench.cpu_share import fall_per_round

    # idle passes of 2 s, busy passes of 4 s: half the images/s, a 50% fall (not -100%)
    f = fall_per_round([2.0, 2.0, 1.0], [4.0, 3.0, 4.0])
    assert f["median"] == pytest.approx(0.5) and f["min"] == pytest.approx(1 / 3) and f["max"] == pytest.approx(0.75)
