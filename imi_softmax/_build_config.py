"""What setup.py builds: the CUDA extension, the CPU extension or none, and why (one line).

Imported by setup.py straight from its file (the package itself may not be importable at build
time), so this module imports nothing from imi_softmax and torch only inside ``probe``. The
decision is a pure function of the facts ``probe`` gathers, so tests check it without building.
"""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

# Used when no GPU is visible at build time (pip's isolated build on a login node, a CI runner):
# torch's own detection then has nothing to read and raises IndexError. sm_80 (A100) and sm_90
# (H100) as binaries, PTX of sm_90 for newer GPUs (JIT-compiled by the driver).
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

# Headers that torch's CUDA headers include: without them the CUDA glue cannot compile.
REQUIRED_CUDA_HEADERS = ("cuda_runtime_api.h", "cublas_v2.h", "cusparse.h")

MODES = ("cuda", "cpu", "none")


def env_flag(env: Mapping[str, str], name: str) -> bool:
    """True when env[name] is set to anything but '', '0', 'false' (any case) or 'no'."""
    return env.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


@dataclass
class BuildFacts:
    """What the build machine has. ``probe`` fills it; tests build it by hand."""
    torch_version: Optional[str]          # None: torch cannot be imported
    torch_cuda: Optional[str]             # torch.version.cuda ("13.0"), None for a CPU torch
    cuda_home: Optional[str]              # torch.utils.cpp_extension.CUDA_HOME
    nvcc_version: Optional[str]           # "13.0" from `nvcc --version`, None if it did not run
    gpu_count: int = 0                    # GPUs torch sees at build time
    toolkit_missing: List[str] = field(default_factory=list)    # REQUIRED_CUDA_HEADERS not in CUDA_HOME/include, CPATH
    pip_include_dirs: List[str] = field(default_factory=list)   # site-packages/nvidia/*/include (cu13: nvidia/cu13/include)
    missing_headers: List[str] = field(default_factory=list)    # REQUIRED_CUDA_HEADERS found nowhere


@dataclass
class BuildPlan:
    mode: str                              # "cuda" | "cpu" | "none"
    reason: Optional[str] = None           # one line for the user; None when nothing to explain
    arch_list: Optional[str] = None        # TORCH_CUDA_ARCH_LIST to set before building (cuda mode)
    extra_include_dirs: List[str] = field(default_factory=list)

    def message(self) -> Optional[str]:
        if self.reason is None:
            return None
        what = {"cuda": "building the CUDA extension", "cpu": "building the CPU extension only",
                "none": "installing without the compiled extension (pure-PyTorch fallback, slower)"}[self.mode]
        return f"imi_softmax: {what}: {self.reason}"


def _major(version: Optional[str]) -> Optional[str]:
    return None if version is None else version.split(".")[0]


def decide(env: Mapping[str, str], facts: BuildFacts) -> BuildPlan:
    """The build plan for this environment (IMI_NO_EXTENSION, IMI_FORCE_CPU, IMI_FORCE_CUDA first)."""
    if env_flag(env, "IMI_NO_EXTENSION"):
        return BuildPlan("none", "IMI_NO_EXTENSION is set")
    if facts.torch_version is None:
        return BuildPlan("none", "torch is not importable at build time (install torch, then "
                                 "`pip install --no-build-isolation .`)")
    if env_flag(env, "IMI_FORCE_CPU"):
        return BuildPlan("cpu", "IMI_FORCE_CPU is set")
    arch = None
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip() in ("", "native") and facts.gpu_count == 0:
        arch = DEFAULT_ARCH_LIST
    # pip's headers only where the toolkit lacks some: given with -I they would shadow its own
    extra = list(facts.pip_include_dirs) if facts.toolkit_missing else []
    if env_flag(env, "IMI_FORCE_CUDA"):
        why = "IMI_FORCE_CUDA is set"
        if arch is not None:
            why += f"; no GPU visible, TORCH_CUDA_ARCH_LIST defaults to {arch}"
        return BuildPlan("cuda", why, arch, extra)
    if facts.torch_cuda is None:
        return BuildPlan("cpu", f"torch {facts.torch_version} is a CPU build")
    if facts.cuda_home is None:
        return BuildPlan("cpu", "no CUDA toolkit found (set CUDA_HOME or put nvcc on the PATH)")
    if facts.nvcc_version is None:
        return BuildPlan("cpu", f"nvcc under CUDA_HOME={facts.cuda_home} did not run")
    if _major(facts.nvcc_version) != _major(facts.torch_cuda):
        return BuildPlan("cpu", f"nvcc is CUDA {facts.nvcc_version} but torch was built with CUDA "
                                f"{facts.torch_cuda} (install the matching toolkit or torch)")
    if facts.missing_headers:
        return BuildPlan("cpu", "CUDA headers not found: " + ", ".join(facts.missing_headers)
                         + " (set CPATH or install the CUDA toolkit's development headers)")
    why = None if arch is None else f"no GPU visible, TORCH_CUDA_ARCH_LIST defaults to {arch}"
    return BuildPlan("cuda", why, arch, extra)


def nvcc_version(cuda_home: Optional[str]) -> Optional[str]:
    """'13.0' from `$CUDA_HOME/bin/nvcc --version`, None if it is missing or does not run."""
    if cuda_home is None:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def toolkit_include_dirs(cuda_home: Optional[str], env: Mapping[str, str]) -> List[str]:
    """CUDA_HOME/include and the CPATH entries (where the compilers look on their own)."""
    dirs = [os.path.join(cuda_home, "include")] if cuda_home is not None else []
    dirs += [d for d in env.get("CPATH", "").split(os.pathsep) if d]
    return [d for d in dirs if os.path.isdir(d)]


def pip_include_dirs(site_dirs: List[str]) -> List[str]:
    """Include folders of pip's nvidia-* wheels: ``nvidia/cu13/include`` for torch's cu13 builds,
    ``nvidia/<library>/include`` before."""
    dirs = []
    for site in site_dirs:
        root = os.path.join(site, "nvidia")
        if os.path.isdir(root):
            dirs += [os.path.join(root, sub, "include") for sub in sorted(os.listdir(root))
                     if os.path.isdir(os.path.join(root, sub, "include"))]
    return dirs


def missing_headers(include_dirs: List[str]) -> List[str]:
    return [h for h in REQUIRED_CUDA_HEADERS
            if not any(os.path.exists(os.path.join(d, h)) for d in include_dirs)]


def probe(env: Mapping[str, str]) -> BuildFacts:
    """Facts of this machine (imports torch; never raises)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # noqa: BLE001 - any failure to import torch means "no torch to build against"
        return BuildFacts(None, None, None, None)
    try:
        gpus = torch.cuda.device_count() if torch.version.cuda is not None else 0
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" for the build
        gpus = 0
    site_dirs = [os.path.dirname(os.path.dirname(torch.__file__))] + [p for p in sys.path if p.endswith("site-packages")]
    toolkit = toolkit_include_dirs(CUDA_HOME, env)
    pip = pip_include_dirs(list(dict.fromkeys(site_dirs)))
    return BuildFacts(torch.__version__, torch.version.cuda, CUDA_HOME, nvcc_version(CUDA_HOME), gpus,
                      missing_headers(toolkit), pip, missing_headers(toolkit + pip))
