"""Plain data types exchanged between the engine and its doors (no transport types here)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np


class Priority(enum.IntEnum):
    """Queue lanes. ADMIN work (warm-up, probes, admin callers) skips the normal lane."""

    NORMAL = 1
    ADMIN = 3


class InputType(str, enum.Enum):
    """Which prompt prefix a model applies (E5's ``query: ``/``passage: ``, BGE's instruction)."""

    NONE = 'none'
    QUERY = 'query'
    PASSAGE = 'passage'


@dataclass
class EmbedRequest:
    inputs: List[str]
    model: str = ''                      # '' = the engine's default model
    normalize: Optional[bool] = None     # None = the model's configured default
    truncate: bool = True                # False: over-long input -> INPUT_TOO_LONG
    input_type: InputType = InputType.NONE
    priority: Priority = Priority.NORMAL
    timeout_s: Optional[float] = None    # None = engine inference timeout (5 s)
    # The caller's own ask in seconds (a REST X-Request-Timeout-Ms, a gRPC deadline, a ROS
    # timeout_s), before a door caps it to its --timeout (timeout_s): it bounds the call from
    # its arrival, a cold model load included (TIMEOUT when it runs out while the model loads).
    # timeout_s, the server's budget, starts after a load, which has its own limit
    # (model_load_s). None: only timeout_s.
    caller_budget_s: Optional[float] = None
    request_id: str = ''
    transport: str = 'inproc'            # label for metrics/logs: ros, rest, grpc, inproc


@dataclass
class EmbedResult:
    embeddings: np.ndarray               # float32 [len(inputs), dimension], input order
    model: str                           # the model id that served the request
    dimension: int
    total_tokens: int
    truncated_inputs: int
    duration_ms: float
    provider: str


class ModelStatus(str, enum.Enum):
    AVAILABLE = 'available'      # files installed, not loaded
    LOADING = 'loading'
    LOADED = 'loaded'
    FAILED = 'failed'            # last load failed (see ModelInfo.error)
    UNAVAILABLE = 'unavailable'  # files not installed: listed, never hidden


@dataclass
class ModelInfo:
    id: str
    name: str
    dimension: int
    params: int
    memory_mb: int
    max_tokens: int
    latency_p95_ms: float
    throughput_qps: float
    status: ModelStatus
    provider: str = ''           # active execution provider when loaded
    pooling: str = 'mean'
    is_default: bool = False
    error: str = ''
    in_flight: int = 0


@dataclass
class HealthInfo:
    status: str                               # healthy | degraded | unhealthy
    checks: Dict[str, str] = field(default_factory=dict)
    version: str = ''
    provider: str = ''                        # provider of the default model
    provider_note: str = ''                   # e.g. why a GPU was not used
    queue_size: int = 0
    queue_capacity: int = 0
    default_model: str = ''
