"""REST client for the akidb_ros bridge (``/api/v1/embed``, ``/models``, ``/health`` ...)."""
from __future__ import annotations

import collections.abc
import email.utils
import math
import os
import re
import socket
import ssl
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import SplitResult, urlsplit

import numpy as np
import requests
import urllib3

from akidb_ros.client.errors import (AkidbError, DeadlineExceededError, ProtocolError,
                                     ServerError, ServiceUnavailableError, TLSError,
                                     code_from_http, make_error)
from akidb_ros.client.retry import RetryPolicy, call_with_retry

# The header says at most this much: earlier servers refused more, and a server caps the
# header at its own per-request budget (--timeout) anyway. A longer client budget still waits.
MAX_SERVER_TIMEOUT_MS = 600_000
# The most a REST answer may hold before the client gives up reading it: the largest answer the
# server gives (256 inputs x 2560 dims as JSON) is ~15 MB; a proxy or a wrong server streaming
# without end would otherwise fill the client's memory within its budget.
MAX_RESPONSE_BYTES = 64 << 20
_READ_CHUNK = 64 * 1024


@dataclass
class Embeddings:
    embeddings: np.ndarray          # float32 [n, dim], input order
    model: str
    total_tokens: int
    duration_ms: float
    truncated_inputs: int = 0
    request_id: str = ''
    extra: Dict[str, Any] = field(default_factory=dict)


def embedding_rows(rows: Any, n_inputs: int) -> np.ndarray:
    """float32 ``[n_inputs, dim]`` from a server's rows; ``ValueError``/``TypeError`` when the
    answer is not one vector per input, all of one size > 0 (shared with the gRPC client)."""
    emb = np.asarray(rows, dtype=np.float32)
    if n_inputs == 0 and emb.size == 0:
        return np.zeros((0, 0), np.float32)
    if emb.ndim != 2 or emb.shape[0] != n_inputs or not emb.shape[1]:
        raise ValueError(f'embeddings of shape {emb.shape} for {n_inputs} inputs')
    return emb


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


# -- caller mistakes: refused at once (shared with the gRPC client) ---------------------------
# The longest budget a call may have (~3 years): urllib3's socket timeout overflowed above
# ~9.2e9 s (a bare OverflowError after the request was sent) and gRPC's deadline above ~7.4e9 s
# (an instant, retried TIMEOUT).
MAX_TIMEOUT_S = 1e8


def check_timeout(value: Any, name: str = 'timeout_s') -> float:
    """A budget in seconds: a finite number > 0 and at most ``MAX_TIMEOUT_S``, else
    ``TypeError``/``ValueError``."""
    if value is None:
        raise ValueError(f'{name}=None: every call has a budget; give a number of seconds > 0')
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must be a number of seconds > 0, got {type(value).__name__} '
                        f'{value!r}')
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f'{name} must be a finite number of seconds > 0, got {value!r}')
    if value > MAX_TIMEOUT_S:
        raise ValueError(f'{name} must be at most {MAX_TIMEOUT_S:g} s, got {value!r}')
    return float(value)


def check_inputs(inputs: Any, what: str = 'inputs') -> List[str]:
    """``inputs`` as a list of str (one str is a batch of one); anything else ``TypeError``."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (bytes, bytearray, memoryview)):
        raise TypeError(f'{what} must be a str or a sequence of str, got '
                        f'{type(inputs).__name__}: decode it first (e.g. data.decode("utf-8"))')
    # only a sequence: a set has no order (the vectors would come back in one nobody chose), a
    # dict would send its keys, and an iterator is used up by this check
    if isinstance(inputs, np.ndarray) and inputs.ndim == 1:
        items = inputs.tolist()
    elif isinstance(inputs, collections.abc.Sequence):
        items = list(inputs)
    else:
        raise TypeError(f'{what} must be a str or a sequence of str (a list or tuple), got '
                        f'{type(inputs).__name__}: pass a list (list(...) keeps an iterator\'s '
                        'order; a set has none, and of a dict its keys would be sent)')
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f'{what}[{i}] must be a str, got {type(item).__name__} {item!r:.60}')
    return items


# as the server's doors: another id is replaced there by a fresh one, so it would name nothing
_REQUEST_ID_RE = re.compile(r'[A-Za-z0-9._:/+=-]{1,128}')


def check_request_id(request_id: Any) -> Optional[str]:
    """``request_id``: None or '' (a fresh one), else 1 to 128 of ``A-Za-z0-9._:/+=-``."""
    if request_id is None or request_id == '':
        return None
    if not isinstance(request_id, str):
        raise TypeError(f'request_id must be a str or None, got {type(request_id).__name__}')
    if not _REQUEST_ID_RE.fullmatch(request_id):
        raise ValueError(f'request_id must be 1 to 128 characters of A-Z a-z 0-9 . _ : / + = -, '
                         f'got {request_id!r:.80}')
    return request_id


def check_embed_options(model: Any, normalize: Any, truncate: Any, input_type: Any,
                        request_id: Any = None) -> Optional[str]:
    """The options of ``embed`` (shared with the gRPC client, so both refuse alike); returns
    the request id (None: make one)."""
    if model is not None and not isinstance(model, str):
        raise TypeError(f'model must be a str (a model id; "" or None: the server\'s default), '
                        f'got {type(model).__name__} {model!r:.60}')
    for name, value in (('normalize', normalize), ('truncate', truncate)):
        if not isinstance(value, bool):
            raise TypeError(f'{name} must be True or False, got {type(value).__name__} '
                            f'{value!r:.60}')
    if input_type is not None and not isinstance(input_type, str):
        raise TypeError(f'input_type must be a str (none, query or passage) or None, got '
                        f'{type(input_type).__name__} {input_type!r:.60}')
    return check_request_id(request_id)


def check_retry(retry: Any) -> Optional[RetryPolicy]:
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise TypeError(f'retry must be a RetryPolicy (NO_RETRY: none) or None (the default), '
                        f'got {type(retry).__name__} {retry!r:.60}')
    return retry


def check_model(model: Any) -> str:
    if not isinstance(model, str):
        raise TypeError(f'model must be a str (a model id), got {type(model).__name__} '
                        f'{model!r:.60}')
    return model


def check_base_url(base_url: Any) -> SplitResult:
    """The parts of an ``http(s)://host[:port][/path]`` URL, else ``TypeError``/``ValueError``
    here rather than requests' ``InvalidURL`` at the first call."""
    if not isinstance(base_url, str):
        raise TypeError(f'base_url must be a str, got {type(base_url).__name__}')
    why = ''
    try:
        parts = urlsplit(base_url)
        port = parts.port       # ValueError: not a number, or not 0 to 65535
    except ValueError as exc:
        parts, port, why = None, None, f': {exc}'
    if parts is not None and parts.scheme in ('http', 'https'):
        if any(c.isspace() or not c.isprintable() for c in base_url):
            why = ': it holds a space or a control character'
        elif not parts.hostname:
            why = ': no host'
        elif port == 0:
            why = ': port 0'
        elif parts.query or parts.fragment:
            why = ': a query or fragment (the API paths are appended to base_url)'
        else:
            return parts
    raise ValueError(f"base_url must be an http:// or https:// URL with a host and an optional "
                     f"port 1 to 65535, such as 'http://127.0.0.1:8080', got {base_url!r}{why}")


def check_headers(headers: Any) -> Dict[str, str]:
    """Headers to send with every request: str names and values, each on one line."""
    if headers is None:
        return {}
    if not isinstance(headers, collections.abc.Mapping):
        raise TypeError(f'headers must be a dict of str to str, got {type(headers).__name__}')
    for k, v in headers.items():
        # values unquoted: a header may hold a key
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f'headers must be a dict of str to str, got {type(k).__name__} '
                            f'{k!r:.40} to a {type(v).__name__}')
        if any(c in k + v for c in '\r\n\0'):
            raise ValueError(f'headers: {k!r:.40} or its value holds a line break or NUL')
    return dict(headers)


def check_tls_files(ca_file: Optional[str], client_cert: Optional[str],
                    client_key: Optional[str]) -> None:
    """Refuse unusable TLS files at construction (``ValueError`` naming the file)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError('client_cert and client_key go together: give both (PEM files) or '
                         'neither')
    for name, path in (('ca_file', ca_file), ('client_cert', client_cert),
                       ('client_key', client_key)):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f'{name} {path!r} is missing (not a file)')
    ctx = ssl.create_default_context()
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f'ca_file {ca_file!r} is not a usable PEM CA bundle: {exc}') \
                from None
    if client_cert is not None:
        try:
            ctx.load_cert_chain(client_cert, client_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f'client_cert {client_cert!r} with client_key {client_key!r} '
                             f'cannot be loaded (not PEM, or the key does not match): {exc}') \
                from None


# -- TLS failures: a configuration problem, not retried --------------------------------------
_TRANSIENT_TLS = ('EOF occurred', 'UNEXPECTED_EOF', 'unexpected eof')


def _causes(exc: BaseException, seen=None) -> Iterable[BaseException]:
    seen = seen if seen is not None else set()
    if exc is None or id(exc) in seen:
        return
    seen.add(id(exc))
    yield exc
    for nxt in (exc.__cause__, getattr(exc, 'reason', None),
                *[a for a in getattr(exc, 'args', ()) if isinstance(a, BaseException)]):
        if isinstance(nxt, BaseException):
            yield from _causes(nxt, seen)


def tls_failure(exc: BaseException) -> Optional[str]:
    """A sentence saying what went wrong when ``exc`` is a TLS handshake failure, else None
    (an abrupt close in the handshake, e.g. a busy or restarting server, stays transient)."""
    found = None
    for e in _causes(exc):
        if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return None
        if isinstance(e, ssl.SSLError) and found is None:
            found = e
    text = str(found if found is not None else exc)
    if found is None and not isinstance(exc, requests.exceptions.SSLError):
        return None
    if any(t in text for t in _TRANSIENT_TLS):
        return None
    if isinstance(found, ssl.SSLCertVerificationError) or 'CERTIFICATE_VERIFY_FAILED' in text:
        return (f"the server's certificate is not trusted ({text}): pass ca_file= the CA that "
                'signed it (and use the host name the certificate names)')
    if 'WRONG_VERSION_NUMBER' in text or 'wrong version number' in text:
        return f'the server does not speak TLS here ({text}): use http:// or the TLS port'
    if 'ALERT' in text.upper():
        return (f'the server refused the TLS handshake ({text}): it may require a client '
                'certificate signed by its CA (client_cert=, client_key=)')
    return f'TLS handshake failed ({text})'


def probe_tls(addr: Tuple[str, int], ca_file: Optional[str], verify: bool,
              client_cert: Optional[str], client_key: Optional[str],
              server_name: Optional[str] = None, alpn: Optional[List[str]] = None,
              timeout_s: float = 0.5) -> Optional[str]:
    """One TLS handshake of our own after a connection the server closed, sending nothing.

    With TLS 1.3 a server refuses the client certificate (or its absence) only after the
    handshake, so the failed call may have seen a bare reset; here the server's alert, or its
    close right after the handshake, says it refused us (the sentence returned), while an
    outage fails the handshake itself and an accepting server sends its first bytes (HTTP/2)
    or waits for a request (HTTP/1.1): None.
    """
    handshaken = False
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if client_cert:
            ctx.load_cert_chain(client_cert, client_key)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        with socket.create_connection(addr, timeout=timeout_s) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name or addr[0]) as tls:
                handshaken = True
                if tls.recv(1):         # the server's first bytes: it accepted us
                    return None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        pass
    except ssl.SSLError as exc:
        return tls_failure(exc)
    except (OSError, ValueError):       # refused, timed out (accepted, waiting): no verdict
        return None
    if not handshaken:
        return None
    return ('the server closed the connection right after the TLS handshake: it refused the '
            'client certificate (or its absence); give client_cert= and client_key= signed by '
            'the CA it trusts')


class RestClient:
    """Thread-safe (one HTTP session per thread). Raises :class:`AkidbError` subclasses.

    ``timeout_s``: the overall budget of a call (connect, wait, read the whole answer, and
    every retry with its backoff), a finite number > 0 (None is refused). ``headers``: sent
    with every request (e.g. ``{'X-API-Key': key}``). TLS (``https://`` only): ``ca_file``
    (the CA bundle that signed the server's certificate; default: the system's),
    ``verify=False`` (no check, testing only), ``client_cert`` + ``client_key`` (PEM files:
    mutual TLS). ``max_response_bytes``: the most an answer may hold (64 MiB; more is
    ``InvalidRequestError`` ``INPUT_TOO_LARGE``, not retried). Redirects are not followed (an
    answer 3xx is a :class:`ProtocolError` naming where it points). A usable client after
    :meth:`close` is a new one; ``with RestClient(...) as c:`` closes it at the end.

    >>> c = RestClient('http://127.0.0.1:8080')
    >>> out = c.embed(['hello robot'])          # doctest: +SKIP
    >>> out.embeddings.shape                    # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, base_url: str = 'http://127.0.0.1:8080', timeout_s: float = 10.0,
                 retry: Optional[RetryPolicy] = None, headers: Optional[Dict[str, str]] = None,
                 connect_timeout_s: float = 2.0, *, ca_file: Optional[str] = None,
                 verify: bool = True, client_cert: Optional[str] = None,
                 client_key: Optional[str] = None, max_response_bytes: int = MAX_RESPONSE_BYTES):
        parts = check_base_url(base_url)
        self.base_url = base_url.rstrip('/')
        self.timeout_s = check_timeout(timeout_s)
        self.connect_timeout_s = check_timeout(connect_timeout_s, 'connect_timeout_s')
        self.retry = check_retry(retry) or RetryPolicy()
        self.headers = check_headers(headers)
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or \
                max_response_bytes <= 0:
            raise ValueError(f'max_response_bytes must be a number of bytes > 0, got '
                             f'{max_response_bytes!r}')
        self.max_response_bytes = max_response_bytes
        if not isinstance(verify, bool):
            raise TypeError('verify must be True or False (give a CA bundle as ca_file=)')
        if parts.scheme != 'https' and (ca_file or client_cert or client_key or not verify):
            raise ValueError('ca_file, verify, client_cert and client_key need an https:// '
                             f'base_url, got {base_url!r}')
        if ca_file is not None and not verify:
            raise ValueError('ca_file= with verify=False: the CA would not be used')
        check_tls_files(ca_file, client_cert, client_key)
        # passed with every request: requests lets REQUESTS_CA_BUNDLE override a session's
        # verify, never a request's
        self._verify = ca_file if ca_file is not None else verify
        self._tls = (ca_file, verify, client_cert, client_key) if parts.scheme == 'https' \
            else None
        self._cert: Optional[Tuple[str, str]] = (client_cert, client_key) if client_cert \
            else None
        self._local = threading.local()
        self._sessions: 'weakref.WeakSet[requests.Session]' = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        if self._closed:
            raise ValueError('RestClient is closed: make a new one')
        s = getattr(self._local, 'session', None)
        if s is None:
            s = requests.Session()
            s.headers.update({'Content-Type': 'application/json', **self.headers})
            self._local.session = s
            with self._lock:
                self._sessions.add(s)
        return s

    def close(self) -> None:
        """Close every thread's connections; calls after this raise ``ValueError``."""
        with self._lock:
            self._closed = True
            sessions = list(self._sessions)
            self._sessions = weakref.WeakSet()
        for s in sessions:
            s.close()
        self._local.session = None

    def __enter__(self) -> 'RestClient':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _once(self, method: str, path: str, body: Any, timeout_s: float, request_id: str,
              extra_headers: Optional[Dict[str, str]] = None,
              accept: Tuple[int, ...] = ()) -> requests.Response:
        deadline = time.monotonic() + timeout_s
        headers = {'X-Request-ID': request_id,
                   'X-Request-Timeout-Ms': str(min(MAX_SERVER_TIMEOUT_MS,
                                                   max(1, int(timeout_s * 1000))))}
        headers.update(extra_headers or {})
        try:
            resp = self._session().request(
                method, self.base_url + path, json=body, headers=headers, stream=True,
                verify=self._verify, cert=self._cert, allow_redirects=False,
                timeout=(min(self.connect_timeout_s, timeout_s), timeout_s))
        except requests.Timeout as exc:
            raise self._timeout(timeout_s, exc, request_id) from None
        except requests.ConnectionError as exc:
            raise self._unreachable(exc, request_id) from None
        self._read_body(resp, deadline, timeout_s, request_id)
        resp.akidb_request_id = resp.headers.get('X-Request-ID') or request_id
        if 300 <= resp.status_code < 400:
            # followed, a redirect would carry the API key to wherever it points (another
            # host), turn a POST into a GET, and loop unbounded by the budget
            raise self._bad_answer(resp, f"a redirect to {resp.headers.get('Location')!r}, "
                                   'not followed: give that URL as base_url')
        if resp.status_code >= 400 and resp.status_code not in accept:
            raise self._error(resp, request_id)
        return resp

    def _timeout(self, timeout_s: float, exc: Any, request_id: str) -> AkidbError:
        return DeadlineExceededError(f'no complete answer within {timeout_s:.2f} s: {exc}',
                                     code='TIMEOUT', retryable=True, request_id=request_id)

    def _unreachable(self, exc: BaseException, request_id: str) -> AkidbError:
        why = tls_failure(exc)
        if why is None and self._tls is not None and not isinstance(exc, requests.Timeout):
            parts = urlsplit(self.base_url)
            if parts.hostname and not any(isinstance(e, ConnectionRefusedError)
                                          for e in _causes(exc)):
                why = probe_tls((parts.hostname, parts.port or 443), *self._tls,
                                timeout_s=min(0.5, self.connect_timeout_s))
        if why is not None:
            return TLSError(f'TLS with {self.base_url} failed: {why}', code='TLS_ERROR',
                            retryable=False, request_id=request_id)
        return ServiceUnavailableError(f'cannot reach {self.base_url}: {exc}',
                                       code='UNAVAILABLE', retryable=True,
                                       request_id=request_id)

    def _read_body(self, resp: requests.Response, deadline: float, timeout_s: float,
                   request_id: str) -> None:
        """Read the whole body before ``deadline`` (each read waits at most what is left), so
        a server trickling its answer cannot stretch the call past its budget."""
        raw = resp.raw
        conn = getattr(raw, '_connection', None)
        sock = getattr(conn, 'sock', None)
        old_timeout = sock.gettimeout() if sock is not None else None
        chunks: List[bytes] = []
        size = 0
        done = False
        try:
            length = resp.headers.get('Content-Length', '')
            if length.isdigit() and int(length) > self.max_response_bytes:
                raise self._too_large(resp, request_id)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(timeout_s, 'the answer was still arriving', request_id)
                if sock is not None:
                    sock.settimeout(remaining)
                if hasattr(raw, 'read1'):
                    chunk = raw.read1(_READ_CHUNK, decode_content=True)
                else:   # pragma: no cover - urllib3 1.x
                    chunk = raw.read(_READ_CHUNK, decode_content=True)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_response_bytes:
                    raise self._too_large(resp, request_id)
                chunks.append(chunk)
            done = True
        except (urllib3.exceptions.ReadTimeoutError, socket.timeout) as exc:
            raise self._timeout(timeout_s, exc, request_id) from None
        except urllib3.exceptions.DecodeError as exc:
            raise ProtocolError(f'undecodable answer from {self.base_url}: {exc}',
                                code='BAD_RESPONSE', status=resp.status_code,
                                request_id=request_id) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(exc, request_id) from None
        finally:
            if done:
                if sock is not None:
                    try:
                        sock.settimeout(old_timeout)
                    except OSError:
                        pass
                resp._content = b''.join(chunks)
                resp._content_consumed = True
            resp.close()    # back to the pool when read whole, else the connection is dropped

    def _too_large(self, resp: requests.Response, request_id: str) -> AkidbError:
        return make_error(f'the answer from {self.base_url} (HTTP {resp.status_code}) is over '
                          f'max_response_bytes ({self.max_response_bytes}): embed fewer inputs '
                          'per call, or raise max_response_bytes', 'INPUT_TOO_LARGE',
                          status=resp.status_code, request_id=request_id)

    def _json(self, resp: requests.Response) -> Any:
        try:
            return resp.json()
        except (ValueError, RecursionError) as exc:   # json recurses: [[[[... past the limit
            raise self._bad_answer(resp, f'not JSON ({exc})') from None

    def _bad_answer(self, resp: requests.Response, why: str) -> ProtocolError:
        kind = resp.headers.get('Content-Type', '?')
        return ProtocolError(f'unexpected answer from {self.base_url} (HTTP {resp.status_code}, '
                             f'{kind}): {why}', code='BAD_RESPONSE', status=resp.status_code,
                             request_id=getattr(resp, 'akidb_request_id', ''))

    def _field(self, resp: requests.Response, name: str, kind: type) -> Any:
        data = self._json(resp)
        value = data.get(name) if isinstance(data, dict) else None
        if not isinstance(value, kind):
            raise self._bad_answer(resp, f'no {kind.__name__} {name!r} in it')
        return value

    @staticmethod
    def _error(resp: requests.Response, request_id: str) -> AkidbError:
        code, message = '', ''
        try:
            body = resp.json()
            if isinstance(body, dict):
                code = str(body.get('code') or '')
                err = body.get('error')
                message = err.get('message', '') if isinstance(err, dict) else str(err or '')
        except (ValueError, RecursionError):    # typed by its status, as an HTML page is
            message = resp.text[:500]
        code = code or code_from_http(resp.status_code)
        return make_error(message or f'HTTP {resp.status_code}', code, status=resp.status_code,
                          retry_after_s=parse_retry_after(resp.headers.get('Retry-After')),
                          request_id=resp.headers.get('X-Request-ID', request_id))

    def _request(self, method: str, path: str, body: Any = None,
                 timeout_s: Optional[float] = None, retry: Optional[RetryPolicy] = None,
                 request_id: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 accept: Tuple[int, ...] = ()):
        if self._closed:
            raise ValueError('RestClient is closed: make a new one')
        total = self.timeout_s if timeout_s is None else check_timeout(timeout_s)
        retry = check_retry(retry)
        rid = request_id or uuid.uuid4().hex

        def attempt(remaining: Optional[float]):
            budget = total if remaining is None else remaining
            if budget <= 0:
                raise DeadlineExceededError('deadline exceeded before the call', code='TIMEOUT',
                                            retryable=False, request_id=rid)
            return self._once(method, path, body, budget, rid, headers, accept)

        return call_with_retry(attempt, retry or self.retry, deadline_s=total)

    # -- API ----------------------------------------------------------------------------------
    def embed(self, inputs: Sequence[str], model: str = '', normalize: bool = True,
              truncate: bool = True, input_type: Optional[str] = None,
              timeout_s: Optional[float] = None, request_id: Optional[str] = None,
              retry: Optional[RetryPolicy] = None) -> Embeddings:
        """Embed ``inputs`` (a str, or a sequence of str; bytes, sets, dicts and iterators are
        refused with TypeError)."""
        texts = check_inputs(inputs)
        request_id = check_embed_options(model, normalize, truncate, input_type, request_id)
        body: Dict[str, Any] = {'inputs': texts, 'normalize': normalize, 'truncate': truncate}
        if model:
            body['model'] = model
        if input_type:
            body['input_type'] = input_type
        resp = self._request('POST', '/api/v1/embed', body, timeout_s, retry, request_id)
        rid = resp.akidb_request_id
        data = self._json(resp)
        try:
            usage = data.get('usage') or {}
            emb = embedding_rows(data['embeddings'], len(texts))
            model_id = data['model']
            if not isinstance(model_id, str):
                raise TypeError('model is not a str')
            return Embeddings(embeddings=emb, model=model_id,
                              total_tokens=int(usage.get('total_tokens', 0)),
                              duration_ms=float(usage.get('duration_ms', 0)),
                              truncated_inputs=int(usage.get('truncated_inputs', 0)),
                              request_id=rid)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise self._bad_answer(resp, f'not an embedding answer ({exc!r})') from None

    def openai_embeddings(self, input, model: str, encoding_format: str = 'float',
                          timeout_s: Optional[float] = None) -> Dict[str, Any]:
        body = {'input': input, 'model': model, 'encoding_format': encoding_format}
        resp = self._request('POST', '/v1/embeddings', body, timeout_s)
        data = self._json(resp)
        if not isinstance(data, dict):
            raise self._bad_answer(resp, 'not a JSON object')
        return data

    def list_models(self, timeout_s: Optional[float] = None) -> List[Dict[str, Any]]:
        resp = self._request('GET', '/models', None, timeout_s)
        return self._field(resp, 'models', list)

    def health(self, timeout_s: Optional[float] = None) -> Dict[str, Any]:
        """Return the PRD health document (an unhealthy server's 503 is returned, not raised:
        one request, not retried)."""
        resp = self._request('GET', '/health', None, timeout_s,
                             retry=RetryPolicy(max_attempts=1), accept=(503,))
        data = None
        try:
            data = resp.json()
        except (ValueError, RecursionError):
            pass
        if isinstance(data, dict) and 'status' in data:
            return data
        if resp.status_code >= 400:     # a 503 that is no health document: a proxy, shedding
            raise self._error(resp, resp.akidb_request_id)
        raise self._bad_answer(resp, 'not a health document')

    def ready(self, timeout_s: float = 2.0) -> bool:
        try:
            self._request('GET', '/health/ready', None, timeout_s,
                          retry=RetryPolicy(max_attempts=1))
            return True
        except AkidbError:
            return False

    def load_model(self, model: str, timeout_s: float = 120.0) -> Dict[str, Any]:
        resp = self._request('POST', '/admin/models/load', {'model': check_model(model)},
                             timeout_s)
        return self._field(resp, 'model', dict)

    def unload_model(self, model: str, timeout_s: float = 60.0) -> Dict[str, Any]:
        resp = self._request('POST', '/admin/models/unload', {'model': check_model(model)},
                             timeout_s)
        return self._field(resp, 'model', dict)

    def metrics(self, timeout_s: Optional[float] = None) -> str:
        return self._request('GET', '/metrics', None, timeout_s).text


__all__ = ['RestClient', 'Embeddings', 'parse_retry_after', 'ServerError']
