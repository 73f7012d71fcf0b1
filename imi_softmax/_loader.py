"""Loads the compiled library, or registers the pure-PyTorch fallback and says how to get the former."""
import os
import warnings

import torch

_FIX = ("Fix: install a C++ compiler and reinstall with `pip install --no-build-isolation .` "
        "(from the source tree; torch {torch} must be installed first).")

USING_FALLBACK = False
FALLBACK_REASON = None


def _forced() -> bool:
    return os.environ.get("IMI_FORCE_FALLBACK", "0").strip().lower() not in ("", "0", "false", "no", "off")


def missing_ops(names=None) -> list:
    """The ops of this Python package (every op the fallback implements) that torch.ops.imi_softmax lacks."""
    if names is None:
        from ._fallback import __all__ as names
    return [name for name in names if not hasattr(torch.ops.imi_softmax, name)]


def load_library() -> bool:
    """Registers the imi_softmax ops; True if they come from the compiled library (imi_softmax._C).

    Without it (not built, built for another torch, or IMI_FORCE_FALLBACK=1) the pure-PyTorch ops
    of imi_softmax._fallback are registered under the same names and a UserWarning names the fix.
    """
    global USING_FALLBACK, FALLBACK_REASON
    if USING_FALLBACK:
        return False
    if _forced():
        reason = "IMI_FORCE_FALLBACK is set"
    else:
        try:
            from imi_softmax import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
        except ImportError as exc:
            msg = " ".join(str(exc).split())
            if "undefined symbol" in msg or "version" in msg.lower():
                reason = f"its compiled library (imi_softmax._C) was built for another torch version ({msg})"
            else:
                reason = f"its compiled library (imi_softmax._C) is missing ({msg})"
        else:
            missing = missing_ops()
            if missing:
                # The fallback cannot stand in for the missing ops: the library's namespace is
                # already taken by the stale _C, so say how to rebuild instead of failing later
                # with "operator ... does not exist".
                raise ImportError(
                    f"imi_softmax's compiled library (imi_softmax._C) is older than its Python code: it lacks "
                    f"the ops {', '.join(missing)}. Fix: rebuild it (`make build` in the source tree, or "
                    "`pip install --no-build-isolation -e .`), or set IMI_FORCE_FALLBACK=1 to run the "
                    "pure-PyTorch ops.")
            return True
    from ._fallback.register import register

    register()
    USING_FALLBACK, FALLBACK_REASON = True, reason
    warnings.warn(f"imi_softmax runs its pure-PyTorch fallback ops (same math, much slower): {reason}. "
                  + _FIX.format(torch=torch.__version__), UserWarning, stacklevel=2)
    return False
