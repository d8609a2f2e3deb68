"""Measurement helpers shared by the benchmark tools: peak memory, synchronised timing, JSON output.

Needs torch only (no detectron2, no fvcore)."""
import json
import os
import platform
import time

import torch

__all__ = ["device_name", "rss_bytes", "peak_rss_bytes", "reset_peak_rss", "peak_memory_increase", "sync",
           "timed", "write_result"]


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's (platform.processor, or the machine type)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM of this process (getrusage's ru_maxrss is not used: Linux carries it over exec from
    the parent, so a child started by a big parent would report the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS ("5" > /proc/self/clear_refs, Linux >= 4.0), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_increase(fn, device: torch.device) -> int:
    """Bytes by which one call of fn raises the peak memory: torch.cuda.max_memory_allocated above
    what was allocated before the call on CUDA, VmHWM above the RSS before the call on CPU."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        reset_peak_rss()
        base = rss_bytes()
        fn()
        peak = peak_rss_bytes() - base
    return max(peak, 0)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds one call of fn takes, synchronised on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def write_result(path: str, tool: str, device: torch.device, rows, **fields) -> None:
    """Write a benchmark's JSON: the tool, the machine, how memory was measured, the rows."""
    result = dict(
        tool=tool, device=str(device), device_name=device_name(device),
        cpu_threads=torch.get_num_threads(), torch=torch.__version__,
        memory_measure="cuda max_memory_allocated above the inputs" if device.type == "cuda"
        else "peak RSS increase over the state before the measured call, fresh process per case",
        **fields, rows=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> str:
    """The SDPA kernel F.scaled_dot_product_attention picks for these inputs: the first of flash,
    memory-efficient, cuDNN and math (torch's order of preference) that accepts them ("math"
    on CPU, where the others do not exist).  q, k, v (B, h, L, d); mask additive or None."""
    if q.device.type != "cuda":
        return "math (CPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = [("flash", SDPBackend.FLASH_ATTENTION), ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
             ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    for name, backend in names:
        try:
            with sdpa_kernel([backend]), torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return name
        except RuntimeError:
            continue
    return "none"
