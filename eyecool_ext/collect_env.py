"""Environment report for bug reports: ``python -m eyecool_ext.collect_env``.

Prints torch and CUDA versions, the CUDA toolkit found, the compiler, how the extension was built (CUDA or not,
GPU architectures), the CPU and the ISA variant its kernels run (EYECOOL_CPU_ISA), the GPU present, and why the
extension could not be loaded if it could not.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys


def _first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return out[0] if out else "(no output)"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(unavailable: {exc})"


def _toolkit_version(cuda_home):
    if not cuda_home:
        return "not found"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    lines = _first_line([nvcc, "--version"]) if os.path.exists(nvcc) else "no bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
        release = [ln for ln in out.splitlines() if "release" in ln]
        return release[0].strip() if release else lines
    except (OSError, subprocess.SubprocessError):
        return lines


def cpu_model():
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_isa_row():
    """The ISA variant the CPU kernels run, the CPU's best and the cap, e.g. "avx2 (CPU: avx512, EYECOOL_CPU_ISA=avx2)";
    a bad EYECOOL_CPU_ISA is reported, not raised (this report is for bug reports)."""
    import eyecool_ext

    cap = os.environ.get("EYECOOL_CPU_ISA")
    detail = f"CPU: {eyecool_ext.cpu_isa_supported()}, EYECOOL_CPU_ISA={cap if cap else '(unset)'}"
    try:
        return f"{eyecool_ext.cpu_isa()} ({detail})"
    except ValueError as exc:
        return f"error: {exc} ({detail})"


def collect() -> list:
    """(key, value) rows describing this environment."""
    import torch

    import eyecool_ext
    from eyecool_ext import _extension
    from eyecool_ext._cuda_home import find_cuda_home

    cuda_home = find_cuda_home()
    rows = [
        ("Python", sys.version.split()[0]),
        ("Platform", platform.platform()),
        ("torch", f"{torch.__version__} (built with CUDA {torch.version.cuda})"),
    ]
    try:
        import torchvision
        rows.append(("torchvision", torchvision.__version__))
    except ImportError:
        rows.append(("torchvision", "not installed"))
    rows += [
        ("CUDA_HOME (toolkit found)", str(cuda_home)),
        ("CUDA toolkit", _toolkit_version(cuda_home)),
        ("C++ compiler", _first_line([os.environ.get("CXX", "c++"), "--version"]) if shutil.which(
            os.environ.get("CXX", "c++")) else "not found"),
        ("eyecool_ext._C loaded", str(eyecool_ext.compiled())),
    ]
    if eyecool_ext.compiled():
        C = _extension._C
        rows.append(("eyecool_ext built with CUDA", str(C.with_cuda())))
        if C.with_cuda():
            v = C.cuda_version()
            rows.append(("eyecool_ext CUDA runtime", f"{v // 1000}.{(v % 1000) // 10}"))
            rows.append(("eyecool_ext GPU architectures", C.cuda_arch_list() or "(torch default)"))
        rows.append(("eyecool_ext CUDA kernels emulated on the CPU", str(eyecool_ext.compiled_with_cuda_emulation())))
        rows.append(("eyecool_ext location", os.path.dirname(C.__file__)))
        rows.append(("eyecool_ext CPU kernels' ISA", _cpu_isa_row()))
    else:
        rows.append(("eyecool_ext load error", repr(eyecool_ext.load_error())))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            rows.append((f"GPU {i}", f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})"))
    else:
        rows.append(("GPU", "none visible to torch"))
    rows.append(("CPU", cpu_model()))
    rows.append(("CPU threads (torch)", str(torch.get_num_threads())))
    return rows


def main() -> None:
    rows = collect()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
