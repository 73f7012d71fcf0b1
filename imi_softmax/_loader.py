"""Loads the compiled library and names the fix when it is missing or was built for another torch."""
import torch

_FIX = (
    "Rebuild it against the torch you have now ({torch}): from the source tree run "
    "`pip install --no-build-isolation -e .` (or `pip install --force-reinstall --no-build-isolation .`)."
)


def load_library() -> None:
    try:
        from imi_softmax import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        msg = str(exc)
        if "undefined symbol" in msg or "version" in msg.lower():
            why = "imi_softmax's compiled library (imi_softmax._C) was built for another torch version"
        else:
            why = "imi_softmax's compiled library (imi_softmax._C) is missing"
        raise ImportError(f"{why}: {msg}\n" + _FIX.format(torch=torch.__version__)) from exc
