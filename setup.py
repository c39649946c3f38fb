"""Build script for eyecool: one extension, ``eyecool_ext._C``, from every file under ``csrc/``.

CUDA sources (``csrc/cuda/*.cu``) are compiled when torch sees a GPU and a CUDA toolkit is found, or when
``FORCE_CUDA=1``; otherwise a CPU-only extension is built, and it works fully.

Switches (environment variables): FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST="8.0;9.0", MAX_JOBS=N, DEBUG=1
(-O0 -g), NVCC_FLAGS="extra nvcc flags", EYECOOL_CUDA_EMULATION=1 (also compile the CUDA kernels as host code,
``torch.ops.eyecool_emu.*``, so that their launch and indexing code is tested on the CPU; ``make install`` sets
it, a plain ``pip install`` does not). The resolved configuration is printed at build time.
"""
import glob
import importlib.util
import os
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_cuda_home_module():
    """eyecool_ext/_cuda_home.py, loaded by path: the package itself cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("_eyecool_cuda_home", os.path.join(ROOT, "eyecool_ext", "_cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


find_cuda_home = _load_cuda_home_module().find_cuda_home


def _env_flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def pip_cuda_include_dir(cuda_home):
    """A folder with the CUDA headers that torch's build includes but the system toolkit lacks, or None.

    torch's CUDA headers include e.g. cusparse.h, which a bare system toolkit may not have; the pip packages
    torch depends on (nvidia-cusparse, ...) ship them in site-packages/nvidia/cu13/include. That folder cannot
    be put on the include path as a whole: its cuda_runtime_api.h would shadow the toolkit's and fail on
    crt/host_defines.h. So only the headers missing from the toolkit are linked into build/pip_cuda_include.
    """
    toolkit_include = os.path.join(cuda_home, "include")
    roots = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    sources = []
    for root in roots:
        sources += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include")))
        sources += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    missing = {}
    for src in sources:
        for entry in os.listdir(src):
            if entry not in missing and not os.path.exists(os.path.join(toolkit_include, entry)):
                missing[entry] = os.path.join(src, entry)
    if not missing:
        return None
    target = os.path.join(ROOT, "build", "pip_cuda_include")
    os.makedirs(target, exist_ok=True)
    for entry, path in missing.items():
        link = os.path.join(target, entry)
        if os.path.lexists(link):
            if os.path.realpath(link) == os.path.realpath(path):
                continue
            os.remove(link)
        os.symlink(path, link)
    return target


def build_extensions(cuda_home):
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    force_cuda = _env_flag("FORCE_CUDA")
    debug = _env_flag("DEBUG")
    emulation = _env_flag("EYECOOL_CUDA_EMULATION")
    use_cuda = cuda_home is not None and (force_cuda or torch.cuda.is_available())
    if force_cuda and cuda_home is None:
        sys.exit(
            "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a folder with bin/nvcc and "
            "lib64/libcudart.so"
        )

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags = opt + ["-fopenmp", "-DEYECOOL_BUILD"]
    define_macros = []
    if emulation:
        # The host-compiled copies of csrc/cuda/*.cu (each csrc/emulation/<op>.cpp includes its .cu file).
        sources += sorted(glob.glob(os.path.join("csrc", "emulation", "*.cpp")))
        define_macros.append(("EYECOOL_WITH_CUDA_EMULATION", None))
    # libdl: the PNG reader's inflater (libdeflate, else zlib) is found with dlopen at run time, not linked
    # (csrc/cpu/png_inflate.h; libdl is part of libc since glibc 2.34).
    extra_link = ["-fopenmp", "-ldl"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    nvcc_flags = []
    if use_cuda:
        sources += cu_sources
        define_macros.append(("WITH_CUDA", None))
        nvcc_flags = opt + ["-DEYECOOL_BUILD", "--expt-relaxed-constexpr", "-lineinfo"]
        if debug:
            nvcc_flags.append("-G")
        nvcc_flags += os.environ.get("NVCC_FLAGS", "").split()
        extra = pip_cuda_include_dir(cuda_home)
        if extra:
            include_dirs.append(extra)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Nothing to query: build for the GPUs this project targets.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        define_macros.append(("EYECOOL_CUDA_ARCHS", '"%s"' % os.environ.get("TORCH_CUDA_ARCH_LIST", "torch-default").replace(" ", "")))
        ext_cls = CUDAExtension
        extra_compile_args = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        ext_cls = CppExtension
        extra_compile_args = {"cxx": cxx_flags}

    print("eyecool build configuration:")
    print(f"  torch               {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  CUDA used           {use_cuda} (FORCE_CUDA={int(force_cuda)}, GPU visible={torch.cuda.is_available()})")
    print(f"  CUDA_HOME           {cuda_home}")
    print(f"  TORCH_CUDA_ARCH_LIST {os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}")
    print(f"  MAX_JOBS            {os.environ.get('MAX_JOBS', '(all cores)')}")
    print(f"  DEBUG               {int(debug)}")
    print(f"  CUDA emulation      {int(emulation)} (EYECOOL_CUDA_EMULATION)")
    print(f"  cxx flags           {' '.join(cxx_flags)}")
    if use_cuda:
        print(f"  nvcc flags          {' '.join(nvcc_flags)}")
        print(f"  extra include dirs  {' '.join(include_dirs[1:]) or '(none)'}")
    print(f"  sources             {len(sources)} files")

    return [
        ext_cls(
            name="eyecool_ext._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link,
        )
    ]


def main():
    cuda_home = find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it resolves CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension

    class BuildExtensionKeepObjects(BuildExtension):
        """Object files always go to build/temp (also under pip's editable install, which would otherwise use
        a throw-away folder), so that `setup.py build_ext --inplace` after it recompiles only what changed."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", "temp")

    setup(
        packages=find_packages(include=["eyecool_ext", "eyecool_ext.*"])
        + find_packages(where="python", include=["eyecool", "eyecool.*"]),
        package_dir={"eyecool": "python/eyecool"},
        package_data={"eyecool": ["data/*.json", "configs/*.yaml"]},
        ext_modules=build_extensions(cuda_home),
        cmdclass={"build_ext": BuildExtensionKeepObjects.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
