"""Tierline: the client SDK, the command line and the model-building pipeline.

    from tierline import InferenceClient

The SDK's names are loaded on first use, so `import tierline` (the CLI, the
model pipeline) does not pay for gRPC.
"""

__version__ = "0.1.0"

_SDK = ("InferenceClient", "AsyncInferenceClient", "Completion", "Choice", "Usage", "TextStream", "TierlineError",
        "InvalidArgument", "Unauthenticated", "PermissionDenied", "QuotaExceeded", "Unavailable", "DeadlineExceeded")
__all__ = ["__version__", *_SDK]


def __getattr__(name: str):
    if name in _SDK:
        from tierline import client

        return getattr(client, name)
    raise AttributeError(f"module 'tierline' has no attribute {name!r}")
