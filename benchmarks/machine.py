"""What the machine can do and who else uses it, for benchmarks/edge.py: the CPU's flags and its theoretical int8
multiply-add peak, a BERT encoder's multiply-adds per sequence, and the share of the CPUs that other processes used
during a measurement round (/proc/stat)."""

from __future__ import annotations

import os
import subprocess
import time


def cpu_info() -> dict:
    flags, model, mhz = set(), "?", None
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags":
            flags = set(value.split())
        elif key == "model name":
            model = value.strip()
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        max_mhz = next((float(l.split(":")[1]) for l in lscpu.splitlines() if l.startswith("CPU max MHz")), None)
        family = next((l.split(":")[1].strip() for l in lscpu.splitlines() if l.startswith("CPU family")), "?")
    except OSError:
        max_mhz, family = None, "?"
    return {"model": model, "family": family, "mhz": mhz, "max_mhz": max_mhz, "cores": os.cpu_count(),
            "avx2": "avx2" in flags, "fma": "fma" in flags, "avx512f": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags,
            "amx_int8": "amx_int8" in flags, "hypervisor": "hypervisor" in flags}


def macs_per_sequence(config: dict, tokens: int) -> dict:
    """Multiply-adds of one `tokens`-long sequence through a BERT encoder + pooler + classifier."""
    L, H, I = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
    C = len(config.get("id2label", {})) or 2
    T = tokens
    linear = L * (4 * T * H * H + 2 * T * H * I)     # Q, K, V, attention output; FFN in and out
    attention = L * 2 * T * T * H                     # Q K^T and probs V (all heads together)
    head = H * H + H * C                              # pooler (first token) + classifier
    return {"linear": linear, "attention": attention, "head": head, "total": linear + attention + head,
            "layers": L, "hidden": H, "intermediate": I}


def int8_limit(cpu: dict, cores: int) -> dict:
    """Theoretical int8 multiply-add peak of `cores` cores, with the instruction and port assumptions spelled out."""
    ghz = (cpu["max_mhz"] or cpu["mhz"] or 0) / 1000
    if cpu["avx512_vnni"]:
        per_cycle, how = 64, ("AVX-512 VNNI vpdpbusd zmm: 64 u8*s8 MACs per instruction, assumed 1 per cycle "
                              "(one 512-bit FMA port)")
    elif cpu["avx_vnni"]:
        per_cycle, how = 64, "AVX-VNNI vpdpbusd ymm: 32 MACs per instruction, 2 ports"
    elif cpu["avx2"]:
        # No VNNI: an AVX2 u8*s8 kernel does vpmaddubsw (32 MACs -> 16 saturating int16 sums) + vpmaddwd
        # (widen to int32) + vpaddd. Zen 3 has two vector multiply pipes (vpmaddubsw/vpmaddwd ymm: 2 per cycle).
        per_cycle, how = 64, ("AVX2 vpmaddubsw ymm: 32 u8*s8 MACs per instruction, 2 per cycle on 2 vector "
                              "multiply pipes (instruction ceiling; the kernel's vpmaddwd widening step shares "
                              "those pipes, so 32 MACs/cycle is the practical ceiling)")
    else:
        per_cycle, how = 16, "SSE4 pmaddubsw: 16 MACs per instruction, 1 per cycle"
    practical = per_cycle // 2 if (cpu["avx2"] and not (cpu["avx512_vnni"] or cpu["avx_vnni"])) else per_cycle
    return {"ghz": ghz, "macs_per_cycle_per_core": per_cycle, "practical_macs_per_cycle_per_core": practical,
            "cores": cores, "peak_macs_per_s": per_cycle * ghz * 1e9 * cores,
            "practical_peak_macs_per_s": practical * ghz * 1e9 * cores, "instruction": how,
            "fp32_peak_macs_per_s": (16 if cpu["fma"] else 8) * ghz * 1e9 * cores,  # 2 FMA pipes x 8 fp32 lanes
            "clock_note": ("no 'CPU max MHz' in lscpu (KVM guest): the clock is /proc/cpuinfo 'cpu MHz' "
                           "(the nominal TSC clock; boost, if any, is not visible)") if not cpu["max_mhz"] else
            "lscpu CPU max MHz"}


_HZ = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(busy ticks of the whole machine incl. steal, ticks used by `pids`) from /proc: what other processes use
    during a round is the difference."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # user nice system irq softirq steal
    ours = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError):
            pass
    return busy, ours


def other_share(before: tuple[int, int], after: tuple[int, int], wall: float) -> float:
    """Share of all CPUs that processes other than ours used between two cpu_ticks readings."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, other / (_HZ * wall * (os.cpu_count() or 1)))


def other_share_during(pids: list[int], seconds: float) -> float:
    before, t0 = cpu_ticks(pids), time.perf_counter()
    time.sleep(seconds)
    return other_share(before, cpu_ticks(pids), time.perf_counter() - t0)
