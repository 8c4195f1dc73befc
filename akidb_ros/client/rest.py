"""REST client for the akidb_ros bridge (``/api/v1/embed``, ``/models``, ``/health`` ...)."""
from __future__ import annotations

import email.utils
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import requests

from akidb_ros.client.errors import (AkidbError, DeadlineExceededError, ServerError,
                                     ServiceUnavailableError, code_from_http, make_error)
from akidb_ros.client.retry import RetryPolicy, call_with_retry


@dataclass
class Embeddings:
    embeddings: np.ndarray          # float32 [n, dim], input order
    model: str
    total_tokens: int
    duration_ms: float
    truncated_inputs: int = 0
    request_id: str = ''
    extra: Dict[str, Any] = field(default_factory=dict)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After as seconds (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RestClient:
    """Thread-safe (one HTTP session per thread). Raises :class:`AkidbError` subclasses.

    >>> c = RestClient('http://127.0.0.1:8080')
    >>> out = c.embed(['hello robot'])          # doctest: +SKIP
    >>> out.embeddings.shape                    # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, base_url: str = 'http://127.0.0.1:8080', timeout_s: float = 10.0,
                 retry: Optional[RetryPolicy] = None, headers: Optional[Dict[str, str]] = None,
                 connect_timeout_s: float = 2.0):
        self.base_url = base_url.rstrip('/')
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.retry = retry or RetryPolicy()
        self.headers = dict(headers or {})
        self._local = threading.local()

    # -- plumbing -----------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        s = getattr(self._local, 'session', None)
        if s is None:
            s = requests.Session()
            s.headers.update({'Content-Type': 'application/json', **self.headers})
            self._local.session = s
        return s

    def close(self) -> None:
        s = getattr(self._local, 'session', None)
        if s is not None:
            s.close()
            self._local.session = None

    def _once(self, method: str, path: str, body: Any, timeout_s: float, request_id: str,
              extra_headers: Optional[Dict[str, str]] = None) -> requests.Response:
        headers = {'X-Request-ID': request_id,
                   'X-Request-Timeout-Ms': str(max(1, int(timeout_s * 1000)))}
        headers.update(extra_headers or {})
        try:
            resp = self._session().request(
                method, self.base_url + path, json=body, headers=headers,
                timeout=(min(self.connect_timeout_s, timeout_s), timeout_s))
        except requests.Timeout as exc:
            raise DeadlineExceededError(f'no answer within {timeout_s:.2f} s: {exc}',
                                        code='TIMEOUT', retryable=True,
                                        request_id=request_id) from None
        except requests.ConnectionError as exc:
            raise ServiceUnavailableError(f'cannot reach {self.base_url}: {exc}',
                                          code='UNAVAILABLE', retryable=True,
                                          request_id=request_id) from None
        if resp.status_code >= 400:
            raise self._error(resp, request_id)
        return resp

    @staticmethod
    def _error(resp: requests.Response, request_id: str) -> AkidbError:
        code, message = '', ''
        try:
            body = resp.json()
            if isinstance(body, dict):
                code = str(body.get('code') or '')
                err = body.get('error')
                message = err.get('message', '') if isinstance(err, dict) else str(err or '')
        except ValueError:
            message = resp.text[:500]
        code = code or code_from_http(resp.status_code)
        return make_error(message or f'HTTP {resp.status_code}', code, status=resp.status_code,
                          retry_after_s=parse_retry_after(resp.headers.get('Retry-After')),
                          request_id=resp.headers.get('X-Request-ID', request_id))

    def _request(self, method: str, path: str, body: Any = None,
                 timeout_s: Optional[float] = None, retry: Optional[RetryPolicy] = None,
                 request_id: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        total = timeout_s if timeout_s is not None else self.timeout_s
        rid = request_id or uuid.uuid4().hex

        def attempt(remaining: Optional[float]):
            budget = total if remaining is None else remaining
            if budget <= 0:
                raise DeadlineExceededError('deadline exceeded before the call', code='TIMEOUT',
                                            retryable=False, request_id=rid)
            return self._once(method, path, body, budget, rid, headers)

        return call_with_retry(attempt, retry or self.retry, deadline_s=total)

    # -- API ----------------------------------------------------------------------------------
    def embed(self, inputs: Sequence[str], model: str = '', normalize: bool = True,
              truncate: bool = True, input_type: Optional[str] = None,
              timeout_s: Optional[float] = None, request_id: Optional[str] = None,
              retry: Optional[RetryPolicy] = None) -> Embeddings:
        if isinstance(inputs, str):
            inputs = [inputs]
        body: Dict[str, Any] = {'inputs': list(inputs), 'normalize': normalize,
                                'truncate': truncate}
        if model:
            body['model'] = model
        if input_type:
            body['input_type'] = input_type
        resp = self._request('POST', '/api/v1/embed', body, timeout_s, retry, request_id)
        data = resp.json()
        usage = data.get('usage', {})
        emb = np.asarray(data['embeddings'], dtype=np.float32)
        return Embeddings(embeddings=emb, model=data['model'],
                          total_tokens=int(usage.get('total_tokens', 0)),
                          duration_ms=float(usage.get('duration_ms', 0)),
                          truncated_inputs=int(usage.get('truncated_inputs', 0)),
                          request_id=resp.headers.get('X-Request-ID', ''))

    def openai_embeddings(self, input, model: str, encoding_format: str = 'float',
                          timeout_s: Optional[float] = None) -> Dict[str, Any]:
        body = {'input': input, 'model': model, 'encoding_format': encoding_format}
        return self._request('POST', '/v1/embeddings', body, timeout_s).json()

    def list_models(self, timeout_s: Optional[float] = None) -> List[Dict[str, Any]]:
        return self._request('GET', '/models', None, timeout_s).json()['models']

    def health(self, timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """Return the PRD health document (an unhealthy server's 503 is returned, not raised)."""
        try:
            return self._request('GET', '/health', None, timeout_s,
                                 retry=RetryPolicy(max_attempts=1)).json()
        except AkidbError as err:
            if err.status == 503:
                resp = self._session().get(self.base_url + '/health', timeout=timeout_s or 5)
                return resp.json()
            raise

    def ready(self, timeout_s: float = 2.0) -> bool:
        try:
            self._request('GET', '/health/ready', None, timeout_s,
                          retry=RetryPolicy(max_attempts=1))
            return True
        except AkidbError:
            return False

    def load_model(self, model: str, timeout_s: float = 120.0) -> Dict[str, Any]:
        return self._request('POST', '/admin/models/load', {'model': model},
                             timeout_s).json()['model']

    def unload_model(self, model: str, timeout_s: float = 60.0) -> Dict[str, Any]:
        return self._request('POST', '/admin/models/unload', {'model': model},
                             timeout_s).json()['model']

    def metrics(self, timeout_s: Optional[float] = None) -> str:
        return self._request('GET', '/metrics', None, timeout_s).text


__all__ = ['RestClient', 'Embeddings', 'parse_retry_after', 'ServerError']
