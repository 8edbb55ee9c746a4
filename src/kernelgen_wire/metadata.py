"""Metadata keys and reason strings of the kernelgen status contract.

A failed call carries its machine-readable reason in the ``kernelgen-reason``
trailer, refining the status code (RESOURCE_EXHAUSTED is ``queue-full``, which
a client may retry, or ``too-large``, which it never should); gRPC's own
``grpc-retry-pushback-ms`` trailer says when (a positive delay) or whether
(negative: never) to retry. A successful ``GenerateKernel`` call carries its
serialized ``ServerReport`` in the ``kernelgen-report-bin`` trailer, so that a
cached kernel's message can be sent as the cache holds it.

An unconditioned request may carry its cache key in the ``kernelgen-cache-key``
header (``cache_key``): a proxy in front of several replicas routes by a
consistent hash of it, so each replica caches its own share of the kernels
(docker/k8s/envoy.yaml). The server ignores it; a conditioned request, which
no cache holds, carries none and is balanced by load.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

__all__ = [
    "CACHE_KEY_HEADER",
    "REASON_TRAILER",
    "REPORT_TRAILER",
    "RETRY_PUSHBACK_TRAILER",
    "Reason",
    "cache_key",
]

#: Trailer of a unary ``GenerateKernel`` call: its serialized ``ServerReport``.
REPORT_TRAILER = "kernelgen-report-bin"
#: Trailer of a failed call: a ``Reason`` value.
REASON_TRAILER = "kernelgen-reason"
#: gRPC's retry pushback trailer, in milliseconds; negative forbids a retry.
RETRY_PUSHBACK_TRAILER = "grpc-retry-pushback-ms"
#: Request header of an unconditioned kernel request: its ``cache_key``, for a proxy's affinity.
CACHE_KEY_HEADER = "kernelgen-cache-key"


def cache_key(identity: str, seq_lens: Sequence[int], dtype: str, representation: str) -> str:
    """The ``kernelgen-cache-key`` value of an unconditioned request: equal exactly when the
    server's cache key is (the model's weights, the grid, the output dtype and representation).

    ``identity`` is the model's ``content_hash`` (``GetModel``), or ``group:<name>`` for a
    group's kernels; ``dtype`` a wire dtype name (``"float32"``, ``"float16"``,
    ``"bfloat16"``); ``representation`` ``"dense"`` or ``"factored"``.

    >>> cache_key("11d907697c99", [15, 15], "float32", "dense")
    '11d907697c99/15x15/float32/dense'
    """
    grid = "x".join(str(int(n)) for n in seq_lens)
    return f"{identity}/{grid}/{dtype}/{representation}"


class Reason(enum.StrEnum):
    """Every value of the ``kernelgen-reason`` trailer, with the status it refines."""

    INVALID_ARGUMENT = "invalid-argument"  # INVALID_ARGUMENT
    GROUP_NOT_MODEL = "group-not-model"  # INVALID_ARGUMENT: a group's name where a model's is expected
    MODEL_NOT_GROUP = "model-not-group"  # INVALID_ARGUMENT: a model's name where a group's is expected
    MODEL_NOT_FOUND = "model-not-found"  # NOT_FOUND
    MODEL_NOT_READY = "model-not-ready"  # FAILED_PRECONDITION: the model failed to load
    NO_FILM = "no-film"  # FAILED_PRECONDITION: conditioning for a model without FiLM
    QUEUE_FULL = "queue-full"  # RESOURCE_EXHAUSTED, retryable after the pushback
    MEMORY_FULL = "memory-full"  # RESOURCE_EXHAUSTED: responses in flight hold the budget; retryable
    TOO_LARGE = "too-large"  # RESOURCE_EXHAUSTED, never retryable
    MESSAGE_TOO_LARGE = "message-too-large"  # RESOURCE_EXHAUSTED: over one message's limit; stream it
    DEADLINE_EXCEEDED = "deadline-exceeded"  # DEADLINE_EXCEEDED
    SLOW_READER = "slow-reader"  # DEADLINE_EXCEEDED: a stream's client stopped taking messages
    CANCELLED = "cancelled"  # CANCELLED
    DRAINING = "draining"  # UNAVAILABLE: the server is shutting down
    INTERNAL = "internal"  # INTERNAL
    SHARED_MEMORY_OFF = "shared-memory-off"  # FAILED_PRECONDITION: the server runs without --shared-memory
    REGION_NOT_FOUND = "region-not-found"  # NOT_FOUND: no shared-memory region of that name
    REGION_EXISTS = "region-exists"  # ALREADY_EXISTS: a shared-memory region of that name is registered
    NOT_SUPPORTED = "not-supported"  # UNIMPLEMENTED: a protocol feature this server does not offer
