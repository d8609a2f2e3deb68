"""Builds enact_ops._C (CPU always; CUDA when available or FORCE_CUDA=1), detectron2-style."""
import glob
import os

import torch
from setuptools import find_namespace_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


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
    # OpenMP for at::parallel_for on CPU (torch's own wheels are built with it).
    extra_compile_args["cxx"].append("-fopenmp")
    return [
        extension(
            "enact_ops._C",
            sorted(sources),
            include_dirs=[os.path.join(HERE, csrc)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ]


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
