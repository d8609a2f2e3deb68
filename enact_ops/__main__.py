"""``python -m enact_ops``: what is built and loaded (torch, the extension file, CPU / CUDA kernels,
the CUDA archs and torch version it was built for, the GPU present) and, where the compiled
kernels will not run, why and how to fix it.  Exit status 1 when the extension did not load."""
import sys

from . import MIN_TORCH, extension_status


def main() -> int:
    s = extension_status()
    rows = [
        ("torch", f"{s['torch']} (needs >= {MIN_TORCH})"),
        ("extension", s["extension_file"] or "-"),
        ("loaded", "yes" if s["loaded"] else f"no ({s['reason']})"),
        ("built for torch", s["built_for_torch"] or "-"),
        ("CPU kernels", "yes" if s["cpu_kernels"] else "no"),
        ("CUDA kernels", f"yes (archs {s['cuda_archs']})" if s["cuda_kernels"] else "no"),
        ("GPU", s["gpu"] or "none visible"),
        ("ENACT_REQUIRE_COMPILED", "1 (no fallback to the reference)" if s["require_compiled"] else "unset"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:>{width}}: {v}")
    if not s["loaded"]:
        print("ENACT runs on the pure-PyTorch reference (about 5x slower); build the kernels with "
              "`pip install --no-build-isolation -e .` (FORCE_CUDA=1 for CUDA).")
    elif s["gpu"] and not s["cuda_kernels"]:
        print("A GPU is visible but the extension has no CUDA kernels: rebuild with FORCE_CUDA=1 CUDA_HOME=... "
              "TORCH_CUDA_ARCH_LIST=...")
    return 0 if s["loaded"] else 1


if __name__ == "__main__":
    sys.exit(main())
