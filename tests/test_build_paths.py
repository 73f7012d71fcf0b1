"""What setup.py builds and why (imi_softmax/_build_config.py), and a wheel that installs and runs
without the compiled extension. Nothing here compiles C++ or downloads anything."""
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext

from imi_softmax import _build_config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def facts(**kw):
    base = dict(torch_version="2.13.0", torch_cuda="13.0", cuda_home="/usr/local/cuda", nvcc_version="13.0",
                gpu_count=0, toolkit_missing=[], pip_include_dirs=["/site/nvidia/cu13/include"], missing_headers=[])
    base.update(kw)
    return cfg.BuildFacts(**base)


# --- the decision table ---------------------------------------------------------------------------

@pytest.mark.parametrize("env, kw, mode, reason_has", [
    ({}, {}, "cuda", "defaults to 8.0;9.0+PTX"),                        # nvcc, CUDA torch, no GPU
    ({}, dict(gpu_count=1), "cuda", None),                               # torch detects the GPU itself
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, {}, "cuda", None),                 # the user's list wins
    ({}, dict(torch_cuda=None), "cpu", "CPU build"),
    ({}, dict(cuda_home=None), "cpu", "no CUDA toolkit"),
    ({}, dict(nvcc_version=None), "cpu", "did not run"),
    ({}, dict(nvcc_version="12.4"), "cpu", "nvcc is CUDA 12.4 but torch was built with CUDA 13.0"),
    ({}, dict(toolkit_missing=["cusparse.h"], missing_headers=["cusparse.h"]), "cpu", "cusparse.h"),
    ({"IMI_FORCE_CPU": "1"}, {}, "cpu", "IMI_FORCE_CPU"),
    ({"IMI_FORCE_CUDA": "1"}, dict(torch_cuda=None, cuda_home=None), "cuda", "IMI_FORCE_CUDA"),
    ({"IMI_FORCE_CUDA": "1", "IMI_FORCE_CPU": "1"}, {}, "cpu", "IMI_FORCE_CPU"),
    ({"IMI_FORCE_CPU": "0"}, {}, "cuda", "defaults to"),                 # "0" means unset
    ({"IMI_NO_EXTENSION": "1"}, {}, "none", "IMI_NO_EXTENSION"),
    ({}, dict(torch_version=None), "none", "torch is not importable"),
])
def test_decide(env, kw, mode, reason_has):
    plan = cfg.decide(env, facts(**kw))
    assert plan.mode == mode
    if reason_has is None:
        assert plan.reason is None or "defaults" not in plan.reason
    else:
        assert reason_has in plan.message()
        assert "\n" not in plan.message()  # one line
    if mode == "cuda" and not env.get("TORCH_CUDA_ARCH_LIST") and kw.get("gpu_count", 0) == 0:
        assert plan.arch_list == cfg.DEFAULT_ARCH_LIST
    if mode == "cuda" and (env.get("TORCH_CUDA_ARCH_LIST") or kw.get("gpu_count")):
        assert plan.arch_list is None


def test_pip_cu13_headers_are_added_only_where_the_toolkit_lacks_them(tmp_path):
    """torch's cu13 wheels ship the CUDA headers under site-packages/nvidia/cu13/include."""
    inc = tmp_path / "nvidia" / "cu13" / "include"
    inc.mkdir(parents=True)
    for h in cfg.REQUIRED_CUDA_HEADERS:
        (inc / h).write_text("")
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)  # a toolkit without its development headers
    (home / "include" / "cuda_runtime_api.h").write_text("")
    toolkit = cfg.toolkit_include_dirs(str(home), {})
    pip = cfg.pip_include_dirs([str(tmp_path), str(tmp_path / "elsewhere")])
    assert toolkit == [str(home / "include")] and pip == [str(inc)]
    assert cfg.missing_headers(toolkit) == ["cublas_v2.h", "cusparse.h"]
    assert cfg.missing_headers(toolkit + pip) == []
    plan = cfg.decide({}, facts(cuda_home=str(home), toolkit_missing=cfg.missing_headers(toolkit), pip_include_dirs=pip))
    assert plan.mode == "cuda" and plan.extra_include_dirs == [str(inc)]
    # a complete toolkit keeps its own headers first: nothing from pip on the -I line
    plan = cfg.decide({}, facts(cuda_home=str(home), toolkit_missing=[], pip_include_dirs=pip))
    assert plan.mode == "cuda" and plan.extra_include_dirs == []
    cpath = tmp_path / "cpath"
    cpath.mkdir()
    assert cfg.toolkit_include_dirs(None, {"CPATH": str(cpath)}) == [str(cpath)]


def test_probe_describes_this_machine():
    f = cfg.probe(dict(os.environ))
    assert f.torch_version == torch.__version__ and f.torch_cuda == torch.version.cuda
    assert f.gpu_count == (torch.cuda.device_count() if torch.version.cuda else 0)


def test_default_arch_list_avoids_torchs_index_error(monkeypatch):
    """Reproduces the reported failure: without TORCH_CUDA_ARCH_LIST and without a visible GPU,
    torch cannot pick an arch and raises IndexError; the plan's default gives sm_80 and sm_90."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(IndexError):
        cpp_ext._get_cuda_arch_flags()
    plan = cfg.decide({}, facts(gpu_count=0))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", plan.arch_list)
    flags = cpp_ext._get_cuda_arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags  # PTX for newer GPUs


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMI_") and k != "PYTHONPATH"}
    env.update(extra)
    return env


def _copy_python_tree(dst):
    """The files a no-extension build needs, copied so that the build leaves the worktree alone."""
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), dst)
    shutil.copytree(os.path.join(ROOT, "imi_softmax"), os.path.join(dst, "imi_softmax"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))


def test_setup_says_why_in_one_line(tmp_path):
    _copy_python_tree(tmp_path)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env=_env(IMI_NO_EXTENSION="1"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("imi_softmax:")]
    assert lines == ["imi_softmax: installing without the compiled extension (pure-PyTorch fallback, "
                     "slower): IMI_NO_EXTENSION is set"]


def test_wheel_without_extension_installs_into_a_fresh_venv_and_runs(tmp_path):
    """pip wheel (no isolation, no compile) -> a fresh venv that sees the shared torch through a
    .pth file -> import warns once and a loss op runs through the pure-PyTorch fallback."""
    src, wheels, venv = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    src.mkdir()
    _copy_python_tree(src)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                            "--no-index", "-w", str(wheels), str(src)],
                           capture_output=True, text=True, timeout=180, env=_env(IMI_NO_EXTENSION="1"))
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("imi_softmax-*.whl")
    assert not any(n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist())
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True,
                          text=True, timeout=120)
    if made.returncode != 0:
        pytest.skip(f"python -m venv failed here: {made.stderr.strip()[:200]}")
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    # the shared torch (and numpy) without installing them: their site-packages, from torch.__file__
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "shared_torch.pth"), "w") as f:
        f.write(torch_site + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=180, env=_env())
    assert inst.returncode == 0, inst.stdout + inst.stderr
    script = textwrap.dedent("""
        import warnings
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            import imi_softmax
            import imi_softmax.functional
        import torch
        assert imi_softmax.__file__.startswith(%r), imi_softmax.__file__
        msgs = [str(w.message) for w in seen if issubclass(w.category, UserWarning) and "imi_softmax" in str(w.message)]
        assert len(msgs) == 1 and "pip install --no-build-isolation ." in msgs[0], msgs
        x = torch.randn(3, 4, dtype=torch.float64)
        w = torch.randn(10, 4, dtype=torch.float64)
        ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
        loss, lse = torch.ops.imi_softmax.sampled_softmax_forward(x, w, None, ids, torch.zeros(3, 3, dtype=torch.float64), True, -100, False)
        ref = torch.logsumexp(torch.einsum("bd,bmd->bm", x, w[ids]), 1) - torch.einsum("bd,bd->b", x, w[ids[:, 0]])
        torch.testing.assert_close(loss, ref)
        print("ran")
    """) % site
    run = subprocess.run([str(py), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=_env())
    assert run.returncode == 0 and "ran" in run.stdout, run.stdout + run.stderr


def test_no_working_compiler_still_installs_and_says_why(tmp_path):
    """CUDA forced but unusable -> CPU; no C++ compiler -> no extension: one line each, exit 0."""
    _copy_python_tree(tmp_path)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env=_env(IMI_FORCE_CUDA="1", CXX="/bin/false", CC="/bin/false"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.startswith("imi_softmax:")]
    assert "building the CPU extension only" in lines[-2]
    assert lines[-1].startswith("imi_softmax: the C++ build failed (")
    assert "pip install --no-build-isolation ." in lines[-1]
    assert not list((tmp_path / "imi_softmax").glob("_C*.so"))


def test_suite_runs_the_compiled_kernels_in_ci():
    """`make test` builds the extension strictly; in CI the suite must exercise the kernels, not the
    pure-PyTorch fallback (which would hide a broken kernel behind passing tests)."""
    import imi_softmax._loader as loader

    if not os.environ.get("CI") or os.environ.get("IMI_FORCE_FALLBACK"):
        pytest.skip("only asserted in CI (CI=true), where the compiled library must load")
    assert not loader.USING_FALLBACK, loader.FALLBACK_REASON


def test_a_compiled_library_older_than_the_python_code_names_the_rebuild(monkeypatch):
    """A _C built from an older checkout lacks the newer ops: importing must say so and how to rebuild,
    not fail later with torch's "operator ... does not exist"."""
    from imi_softmax import _loader

    assert _loader.missing_ops() == []  # this build has every op the package uses
    assert _loader.missing_ops(["midx_sample", "no_such_op"]) == ["no_such_op"]
    monkeypatch.setattr(_loader, "USING_FALLBACK", False)
    monkeypatch.setattr(_loader, "missing_ops", lambda names=None: ["midx_search"])
    if _loader._forced():
        pytest.skip("IMI_FORCE_FALLBACK is set: the compiled library is not loaded")
    with pytest.raises(ImportError, match=r"older than its Python code: it lacks the ops midx_search\. Fix: rebuild"):
        _loader.load_library()
