"""Stand-in for comfy.model_management's interrupt flag (a module-level flag behind a lock)."""

import threading

_lock = threading.RLock()
_interrupted = False


class InterruptProcessingException(Exception):
    pass


def interrupt_current_processing(value=True):
    global _interrupted
    with _lock:
        _interrupted = value


def processing_interrupted():
    with _lock:
        return _interrupted


def throw_exception_if_processing_interrupted():
    """Raises once and clears the flag, as ComfyUI does."""
    global _interrupted
    with _lock:
        if _interrupted:
            _interrupted = False
            raise InterruptProcessingException()
