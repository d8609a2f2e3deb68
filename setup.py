"""Builds enact_ops._C (CPU always; CUDA when available or FORCE_CUDA=1), detectron2-style."""
import glob
import os

import torch
from setuptools import find_namespace_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def check_torch():
    """The torch version check of enact_ops/torch_version.py, before anything is compiled."""
    scope = {}
    with open(os.path.join(HERE, "enact_ops", "torch_version.py")) as f:
        exec(f.read(), scope)
    scope["check_torch"]()


def write_build_info(with_cuda: bool) -> str:
    """enact_ops/csrc/generated/build_info.h: what this build was made for (torch version, CUDA
    archs), compiled into the extension and printed by `python -m enact_ops`.  Returns its folder."""
    folder = os.path.join(HERE, "enact_ops", "csrc", "generated")
    os.makedirs(folder, exist_ok=True)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the GPUs at build time") if with_cuda else ""
    text = (
        "// written by setup.py at build time (not tracked)\n"
        f"#define ENACT_BUILD_TORCH_VERSION {torch.__version__!r}\n"
        f"#define ENACT_BUILD_CUDA_ARCHS {archs!r}\n"
    ).replace("'", '"')
    path = os.path.join(folder, "build_info.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return folder


def get_extensions():
    csrc = os.path.join("enact_ops", "csrc")
    sources = glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    cuda_sources = glob.glob(os.path.join(csrc, "cuda", "*.cu"))
    extra_compile_args = {"cxx": ["-O3"]}
    define_macros = []
    extension = CppExtension
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    if (torch.cuda.is_available() and CUDA_HOME is not None) or force_cuda:
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but CUDA_HOME is not set (e.g. /usr/local/cuda)")
        extension = CUDAExtension
        sources += cuda_sources
        define_macros += [("WITH_CUDA", None)]
        # no --use_fast_math: approximate expf / division would change the pooling weights
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
    include_dirs = [os.path.join(HERE, csrc), write_build_info(extension is CUDAExtension)]
    # OpenMP for at::parallel_for on CPU (torch's own wheels are built with it).
    extra_compile_args["cxx"].append("-fopenmp")
    return [
        extension(
            "enact_ops._C",
            sorted(sources),
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


check_torch()
setup(
    name="enact",
    version="0.1.0",
    description="ENACT: entropy-based attention clustering for detection transformers "
    "(detectron2/detrex extension)",
    python_requires=">=3.10",
    packages=find_namespace_packages(include=["enact_ops", "enact_ops.*", "projects", "projects.*"]),
    package_data={"enact_ops": ["csrc/*.h"]},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
