"""Translations between the akidb_ros ROS interfaces and the engine's plain types.

The node is a thin door: it turns an ``Embed`` request into an :class:`EmbedRequest`, and an
:class:`EmbedResult` or :class:`EngineError` back into the response. No logic lives here.
"""
from __future__ import annotations

import array
import re
import uuid
from typing import List

import numpy as np

from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.types import (EmbedRequest, EmbedResult, InputType, ModelInfo, ModelStatus,
                                    Priority)
from akidb_ros.msg import Embedding
from akidb_ros.msg import ModelInfo as ModelInfoMsg

_INPUT_TYPES = {'': InputType.NONE, 'none': InputType.NONE, 'query': InputType.QUERY,
                'passage': InputType.PASSAGE}

# The sidecar bridge forwards calls that its REST/gRPC doors have already counted. It says so
# at the end of the call's ``request_id`` (after a space: the doors' request ids have none), and
# the node counts such a call under transport ``sidecar`` instead of ``ros``: the shipped
# Prometheus rules count front doors only (rest, grpc, ros), so a request is counted once
# whether robots call the node, or a bridge in this process or in front of it serves it.
# The mark carries a token of the forwarded call's own ('#' and 16 hex digits): the node joins
# copies and withdraws calls (cancel_embed) by request id, and two calls with one caller id (a
# fan-out, a hedged request sent to two bridges, another tenant's id) were joined or withdrawn
# together. A mark without the token (an older bridge) is still taken off.
FORWARDED_MARK = ' via=sidecar'
FORWARDED_TRANSPORT = 'sidecar'
_FORWARDED = re.compile(re.escape(FORWARDED_MARK) + r'(?:#[0-9a-f]{1,32})?\Z')

# std_msgs/String: the request id of an embed call its caller withdraws (relative: under the
# node's namespace, like its services). The sidecar bridge publishes it (RosBackend.cancel),
# the node cancels the call's engine work and answers it CANCELLED (EmbeddingNode._on_cancel).
CANCEL_TOPIC = 'cancel_embed'


def mark_forwarded(request_id: str) -> str:
    """Mark ``request_id`` as the bridge's, for one call it forwards.

    The mark and a token of that call's own (see ``FORWARDED_MARK``); its re-sends carry the
    same id.
    """
    return f'{request_id}{FORWARDED_MARK}#{uuid.uuid4().hex[:16]}'


def split_forwarded(request_id: str):
    """``(caller's request id, forwarded by the bridge?)`` of a received ``request_id``."""
    mark = _FORWARDED.search(request_id)
    if mark is not None:
        return request_id[:mark.start()], True
    return request_id, False


def embed_request_from_msg(msg, transport: str = 'ros') -> EmbedRequest:
    """Build the engine request. ROS has no 'unset' bool: ``normalize`` is sent explicitly.

    The texts arrive as rosidl delivered them: a ROS string ends at its first NUL, so a text
    with U+0000 was already cut by the sender's client library (no ROS client can send one;
    the sidecar bridge refuses such a text before the DDS hop).
    The request id is the caller's (a bridge's forwarding mark taken off).
    """
    try:
        # exact, as REST's schema and gRPC take it ('QUERY' was served here, refused there)
        input_type = _INPUT_TYPES[msg.input_type]
    except KeyError:
        raise EngineError(ErrorCode.INVALID_INPUT,
                          f"input_type must be '', none, query or passage "
                          f'(got {msg.input_type!r})') from None
    timeout = float(msg.timeout_s)
    return EmbedRequest(
        inputs=list(msg.inputs),
        # as sent: REST, gRPC and the engine do not strip a model name either (' x' is unknown)
        model=msg.model,
        normalize=bool(msg.normalize),
        truncate=bool(msg.truncate),
        input_type=input_type,
        # 0 = engine default; anything else (negative, NaN) is passed on for the engine to refuse
        timeout_s=None if timeout == 0.0 else timeout,
        caller_budget_s=None if timeout == 0.0 else timeout,
        request_id=split_forwarded(msg.request_id)[0],
        transport=transport,
        # the admin lane a sidecar's guard granted (it stopped at the DDS hop: a bridge's
        # admin callers were shed at 95 % like everyone else)
        priority=Priority.ADMIN if getattr(msg, 'admin_lane', False) else Priority.NORMAL,
    )


def vectors_to_msgs(embeddings: np.ndarray) -> List[Embedding]:
    """One ``Embedding`` per row; ``array('f')`` is assigned without per-element checks."""
    rows = np.ascontiguousarray(embeddings, dtype=np.float32)
    out = []
    for row in rows:
        values = array.array('f')
        values.frombytes(row.tobytes())
        out.append(Embedding(values=values))
    return out


def fill_embed_response(resp, result: EmbedResult):
    """Fill a successful ``Embed.Response`` from an engine result."""
    resp.embeddings = vectors_to_msgs(result.embeddings)
    resp.model = result.model
    resp.dimension = int(result.dimension)
    resp.total_tokens = int(result.total_tokens)
    resp.truncated_inputs = int(result.truncated_inputs)
    resp.success = True
    resp.error_code = ''
    resp.message = ''
    return resp


def fill_error(resp, err: EngineError):
    """Fill the error fields of any akidb_ros response (Embed, LoadModel, UnloadModel)."""
    resp.success = False
    resp.error_code = err.code.name
    resp.message = err.message
    # the engine's hint (1 s for a timeout, 30 s while a TensorRT engine builds ...): a sidecar
    # bridge passes it on as Retry-After / retry-after, as the in-process doors send it
    resp.retry_after_s = float(err.retry_after_s or 0.0)
    if hasattr(resp, 'embeddings'):
        resp.embeddings = []
    return resp


def model_info_to_msg(info: ModelInfo) -> ModelInfoMsg:
    """Engine ModelInfo -> akidb_ros/msg/ModelInfo."""
    status = info.status.value if isinstance(info.status, ModelStatus) else str(info.status)
    return ModelInfoMsg(
        id=info.id, name=info.name, dimension=int(info.dimension), params=int(info.params),
        memory_mb=int(info.memory_mb), max_tokens=int(info.max_tokens),
        latency_p95_ms=float(info.latency_p95_ms), throughput_qps=float(info.throughput_qps),
        status=status, provider=info.provider or '', pooling=info.pooling or '',
        is_default=bool(info.is_default), in_flight=int(info.in_flight or 0),
        error=info.error or '')


def embeddings_from_response(resp) -> np.ndarray:
    """Client side: ``Embed.Response`` -> float32 array ``[n, dimension]``."""
    if not resp.embeddings:
        return np.zeros((0, int(resp.dimension)), np.float32)
    return np.stack([np.asarray(e.values, dtype=np.float32) for e in resp.embeddings])
