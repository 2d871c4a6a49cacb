"""The one exception tree of the kit.

The CLI maps each class to an exit code: UserError -> 2 (one line, no traceback), AccuracyError -> 1,
BackendError -> 3; Terminated (SIGTERM) -> 143, as KeyboardInterrupt (SIGINT) -> 130. Anything else is a bug
and surfaces with its traceback.
"""

from __future__ import annotations


class AccuLLMError(Exception):
    """Base class of every error the kit raises on purpose."""

    exit_code = 1


class UserError(AccuLLMError):
    """Bad input from the user: a missing path, a file that is not a model, an unsupported option."""

    exit_code = 2


class AccuracyError(AccuLLMError):
    """A validation gate failed; the message names the worst outputs or layers."""

    exit_code = 1


class BackendError(AccuLLMError):
    """A missing or failing backend (TensorRT, CUDA, ONNX Runtime, an optional Python package)."""

    exit_code = 3


class Terminated(BaseException):
    """SIGTERM arrived (the CLI turns the signal into this exception, as Python does SIGINT into
    KeyboardInterrupt), so every ``finally`` and staging-folder cleanup runs; the CLI exits 143.

    A BaseException, like KeyboardInterrupt: ``except Exception`` handlers do not swallow it."""


def require(module_name: str, extra: str):
    """Import an optional dependency or raise BackendError with the install hint.

    Args:
        module_name: the module to import, e.g. "torch".
        extra: the accullm-export extra that installs it, e.g. "export".
    """
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(
            f"{module_name} is not installed ({exc}); install it with: pip install 'accullm-export[{extra}]'"
        ) from exc
