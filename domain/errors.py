"""The few exceptions a caller can act on.

- ``InvalidJob``: the input is wrong. The job is recorded ``rejected`` and never retried.
- ``TransientError``: try again later (connection loss, out-of-memory with a smaller batch...).
- ``JobFailed``: the job cannot succeed as asked; recorded ``failed`` with its code, not retried.
- ``JobTimeout``: the job ran past its time limit (a ``JobFailed``).
"""


class InvalidJob(ValueError):
    def __init__(self, message: str, field: str | None = None, code: str = "invalid"):
        super().__init__(message)
        self.field = field
        self.code = code


class TransientError(RuntimeError):
    def __init__(self, message: str, code: str = "transient"):
        super().__init__(message)
        self.code = code


class JobFailed(RuntimeError):
    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


class JobTimeout(JobFailed):
    def __init__(self, message: str):
        super().__init__(message, code="timeout")


def is_out_of_memory(exc: BaseException) -> bool:
    """Did an allocation fail? CUDA's ``OutOfMemoryError`` ("CUDA out of memory ..."), Python's ``MemoryError``,
    or the CPU allocator's ``RuntimeError`` ("... can't allocate memory ...")."""
    text = str(exc).lower()
    return (isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)
            or "out of memory" in text or "can't allocate memory" in text)
