"""Build of the imi_softmax._C extension.

What is built is decided in imi_softmax/_build_config.py (unit-tested without building):
CUDA kernels when nvcc matches a CUDA build of torch (IMI_FORCE_CUDA=1 / IMI_FORCE_CPU=1
override), the CPU kernels otherwise, and nothing when no C++ build works (IMI_NO_EXTENSION=1
forces that): the package then runs its pure-PyTorch fallback and says so on import. Without a
visible GPU and without TORCH_CUDA_ARCH_LIST, the CUDA build targets sm_80 and sm_90 (+PTX).
Each fallback is one line on stderr, never a traceback; IMI_STRICT_BUILD=1 (set by `make build`)
makes a failed compile fail the build instead, so CI never tests the fallback by accident.
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _plain_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_config():
    # By path: importing the package would need the extension this script is about to build.
    path = os.path.join(ROOT, "imi_softmax", "_build_config.py")
    spec = importlib.util.spec_from_file_location("_imi_build_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cfg = _load_build_config()


def _say(line):
    print(line, file=sys.stderr, flush=True)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extension(mode, plan):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    # -fno-trapping-math: nothing here reads floating-point exception flags, and without it GCC keeps
    # the float->int conversions of the exp/log loops (csrc/include/imi_softmax/common.h) scalar.
    # -fno-math-errno: nothing reads errno either; without it GCC keeps every sqrtf scalar (its errno
    # path for negative inputs), e.g. in the optimizer loops of csrc/cpu/row_optim_cpu.cpp. Results
    # are unchanged (sqrtps is the correctly rounded sqrtf).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DIMI_PYTHON_MODULE"]
    link = ["-fopenmp"]
    if os.environ.get("IMI_SANITIZE", "0") not in ("", "0"):
        # scripts/sanitize_check.sh: AddressSanitizer + UndefinedBehaviorSanitizer, every report fatal
        # (-O1 after torch's -O3 wins); CPU only (the check runs where no GPU is)
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g", "-fno-omit-frame-pointer"] + sanitize
        link = link + sanitize
    if mode == "cuda":
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "imi_softmax._C", sources, include_dirs=include_dirs + plan.extra_include_dirs,
            extra_compile_args={"cxx": cxx + ["-DIMI_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=link,
        )
    return CppExtension(
        "imi_softmax._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=link,
    )


def _build_ext_class(plan):
    """build_ext that degrades instead of failing: CUDA -> CPU -> no extension, one line each."""
    if plan.mode == "none":
        return _plain_build_ext
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class TolerantBuildExt(base):
        def build_extensions(self):
            mode = plan.mode
            while True:
                try:
                    super().build_extensions()
                    return
                except Exception as exc:  # noqa: BLE001 - compiler missing, compile or link error
                    if os.environ.get("IMI_STRICT_BUILD", "0") not in ("", "0"):
                        raise  # `make build` / CI: a broken kernel must fail the build, not fall back
                    why = " ".join(str(exc).split())[:300] or type(exc).__name__
                    if mode == "cuda":
                        _say(f"imi_softmax: the CUDA build failed ({why}); building the CPU extension only")
                        mode = "cpu"
                        # in place: setuptools keeps private state on the Extension it finalized
                        for ext in self.extensions:
                            for key, value in vars(_extension("cpu", plan)).items():
                                if not key.startswith("_"):
                                    setattr(ext, key, value)
                        continue
                    _say(f"imi_softmax: the C++ build failed ({why}); installing without the compiled "
                         "extension (pure-PyTorch fallback, slower). Fix: install a C++ compiler and "
                         "reinstall with `pip install --no-build-isolation .`")
                    self.extensions = []
                    return

        def get_outputs(self):
            return [] if not self.extensions else super().get_outputs()

    return TolerantBuildExt


def _plan():
    env = dict(os.environ)
    plan = cfg.decide(env, cfg.probe(env))
    if plan.message() is not None:
        _say(plan.message())
    if plan.arch_list is not None:
        # torch reads it when it builds the nvcc flags; without a GPU its own detection raises IndexError
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    return plan


def _first_extension(plan):
    if plan.mode == "none":
        return []
    try:
        return [_extension(plan.mode, plan)]
    except Exception as exc:  # noqa: BLE001 - e.g. CUDAExtension without a usable toolkit
        if plan.mode != "cuda":
            raise
        _say(f"imi_softmax: the CUDA extension cannot be set up ({' '.join(str(exc).split())[:300]}); "
             "building the CPU extension only")
        plan.mode = "cpu"
        return [_extension("cpu", plan)]


PLAN = _plan()

setup(
    packages=find_packages(include=["imi_softmax", "imi_softmax.*"]),
    ext_modules=_first_extension(PLAN),
    cmdclass={"build_ext": _build_ext_class(PLAN)},
)
