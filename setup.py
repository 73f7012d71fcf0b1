"""Build of the imi_softmax._C extension.

CPU kernels are always built. CUDA kernels are added when nvcc and a CUDA build of torch are
present; IMI_FORCE_CUDA=1 / IMI_FORCE_CPU=1 override the detection. TORCH_CUDA_ARCH_LIST is
respected (torch's default otherwise).
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - reported to the user at build time
    raise RuntimeError(
        "imi_softmax needs torch at build time. Install torch first, then run "
        "`pip install --no-build-isolation .` (or plain `pip install .`, which installs torch "
        "into the build environment from pyproject.toml)."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _want_cuda() -> bool:
    if _flag("IMI_FORCE_CPU"):
        return False
    if _flag("IMI_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extension():
    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC keeps
    # the float->int conversions of the exp/log loops (csrc/include/imi_softmax/common.h) scalar.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-DIMI_PYTHON_MODULE"]
    link = ["-fopenmp"]
    if _want_cuda():
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "imi_softmax._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DIMI_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=link,
        )
    return CppExtension(
        "imi_softmax._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=link,
    )


setup(
    packages=find_packages(include=["imi_softmax", "imi_softmax.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
