"""gRPC client for ``akidb.embedding.v1.EmbeddingService`` (unary, streaming, health)."""
from __future__ import annotations

import collections
import collections.abc
import uuid
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import grpc

from akidb_ros.client.errors import (AkidbError, DeadlineExceededError, ProtocolError,
                                     TLSError, code_from_grpc, make_error)
from akidb_ros.client.rest import (Embeddings, check_embed_options, check_inputs, check_retry,
                                   check_timeout, check_tls_files, embedding_rows,
                                   parse_retry_after, probe_tls)
from akidb_ros.client.retry import RetryPolicy, call_with_retry
from akidb_ros.grpc_api import embedding_pb2 as pb
from akidb_ros.grpc_api import embedding_pb2_grpc as pb_grpc

# what gRPC's UNAVAILABLE details say when the TLS handshake failed (not a transient outage)
_TLS_MARKERS = ('Ssl handshake failed', 'SSL_ERROR_SSL', 'CERTIFICATE_VERIFY_FAILED',
                'TSI_PROTOCOL_FAILURE', 'WRONG_VERSION_NUMBER', 'tlsv13 alert',
                'tlsv1 alert', 'TLSV13_ALERT', 'TLSV1_ALERT', 'handshake failed',
                'Hostname Verification Check failed')


def _tls_reason(details: str) -> Optional[str]:
    if not any(m in details for m in _TLS_MARKERS):
        return None
    if 'Hostname Verification' in details:
        return (f"the server's certificate does not name the host ({details}): use the name "
                'it was issued for, as the target or server_name=')
    if 'CERTIFICATE_VERIFY_FAILED' in details:
        return (f"the server's certificate is not trusted ({details}): pass ca_file= the CA "
                'that signed it')
    if 'WRONG_VERSION_NUMBER' in details:
        return f'one side does not speak TLS ({details}): check the port and TLS options'
    if 'alert' in details.lower():
        return (f'the server refused the TLS handshake ({details}): it may require a client '
                'certificate signed by its CA (client_cert=, client_key=)')
    return f'TLS handshake failed ({details})'


def error_from_rpc(err: grpc.RpcError, request_id: str = '') -> AkidbError:
    status = err.code() if hasattr(err, 'code') else grpc.StatusCode.UNKNOWN
    md = {}
    try:
        md = {k: v for k, v in (err.trailing_metadata() or ())}
    except Exception:
        pass
    details = (err.details() if hasattr(err, 'details') else str(err)) or ''
    rid = md.get('x-request-id', request_id)
    stream_index = _md_number(md, 'akidb-stream-index', int)
    if not md.get('akidb-error-code') and status == grpc.StatusCode.UNAVAILABLE:
        why = _tls_reason(details)
        if why is not None:
            return TLSError(f'TLS failed: {why}', code='TLS_ERROR', status=status.name,
                            retryable=False, request_id=rid)
    code = md.get('akidb-error-code') or code_from_grpc(status.name, details)
    if code == 'INPUT_TOO_LARGE' and not md.get('akidb-error-code'):
        details += (' (gRPC message limit: the server\'s --max-body-bytes, or this client\'s '
                    'max_message_bytes for what it sends and receives)')
    retry_after = parse_retry_after(md.get('retry-after'))    # as REST's header
    return make_error(details or status.name, code, status=status.name,
                      retry_after_s=retry_after, request_id=rid, stream_index=stream_index)


def _md_number(md: dict, key: str, cast):
    """A number from trailing metadata, None when absent or not a number."""
    try:
        return cast(md[key]) if md.get(key) else None
    except ValueError:
        return None


# REST's truncate and input_type, which the PRD's EmbedRequest has no field for, travel as
# request metadata; the server sends the count of truncated inputs as trailing metadata
TRUNCATE_MD = 'akidb-truncate'
# A channel reconnects at most this long after the server is back: the default retries span
# ~0.7 s (0.1 + 0.2 + 0.4 s), and with 1000 ms a call right after a restart could still fail
# UNAVAILABLE on every attempt (1-4 in 6 in the prober's runs)
MAX_RECONNECT_BACKOFF_MS = 500
INITIAL_RECONNECT_BACKOFF_MS = 100
INPUT_TYPE_MD = 'akidb-input-type'
TRUNCATED_MD = 'akidb-truncated-inputs'


def _options_metadata(truncate: bool, input_type: Optional[str]) -> List[tuple]:
    """The metadata asking for ``truncate`` and ``input_type`` (none for the defaults; their
    types checked by ``check_embed_options``)."""
    md = [] if truncate else [(TRUNCATE_MD, 'false')]
    if input_type:
        md.append((INPUT_TYPE_MD, input_type))     # the server checks the value
    return md


def _to_embeddings(resp: pb.EmbedResponse, n_inputs: int, request_id: str = '',
                   truncated_inputs: int = 0) -> Embeddings:
    try:
        emb = embedding_rows([v.values for v in resp.embeddings], n_inputs)
    except ValueError as exc:
        raise ProtocolError(f'unexpected answer: not an embedding answer ({exc})',
                            code='BAD_RESPONSE', status='OK', request_id=request_id) from None
    return Embeddings(embeddings=emb, model=resp.model, total_tokens=resp.usage.total_tokens,
                      duration_ms=float(resp.usage.duration_ms),
                      truncated_inputs=truncated_inputs, request_id=request_id)


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, 'rb') as fh:
        return fh.read()


def _host_port(target: str):
    """(host, port) of a plain ``host:port`` / ``[v6]:port`` target, else None."""
    for prefix in ('dns:///', 'dns:', 'ipv4:', 'ipv6:'):
        if target.startswith(prefix):
            target = target[len(prefix):]
    host, sep, port = target.rpartition(':')
    if not sep or not port.isdigit() or not host or ',' in host or '/' in host:
        return None
    return host.strip('[]'), int(port)


def _check_metadata(metadata) -> List[tuple]:
    """Metadata to send with every call: str keys to str values (bytes for ``-bin`` keys)."""
    if metadata is None:
        return []
    if not isinstance(metadata, collections.abc.Mapping):
        raise TypeError(f'metadata must be a dict of str to str, got {type(metadata).__name__}')
    for k, v in metadata.items():
        # values unquoted: metadata may hold a key
        if not isinstance(k, str) or not isinstance(v, bytes if k.endswith('-bin') else str):
            raise TypeError(f'metadata must be a dict of str to str (bytes for a -bin key), got '
                            f'{type(k).__name__} {k!r:.40} to a {type(v).__name__}')
    return list(metadata.items())


def _check_batch(batch, index: int) -> List[str]:
    if isinstance(batch, (str, bytes, bytearray)):
        raise TypeError(f'batch {index} is a bare {type(batch).__name__} {batch!r:.60}: '
                        'embed_stream takes an iterable of batches, each a list of str, e.g. '
                        "[['hello', 'robot']] (one batch) or [['hello'], ['robot']] (two)")
    return check_inputs(batch, what=f'batch {index}')


class GrpcClient:
    """Thread-safe. Deadlines on every call; retries only on retryable codes.

    ``timeout_s``: the overall budget of a call (retries and backoff included; for
    :meth:`embed_stream`, the whole stream), a finite number > 0 (None is refused).
    TLS: ``ca_file`` (the CA that signed the server's certificate; default: gRPC's roots),
    ``client_cert`` + ``client_key`` (PEM files: mutual TLS), ``tls=True`` (TLS with the
    default roots and no files), ``server_name`` (the name to check the certificate against
    when ``target`` is an address), or a ready ``channel`` (then none of these).
    ``with GrpcClient(...) as c:`` closes it; a closed client raises ``ValueError``.

    >>> c = GrpcClient('127.0.0.1:9090')
    >>> c.embed(['hello robot'], normalize=True).embeddings.shape   # doctest: +SKIP
    (1, 384)
    """

    def __init__(self, target: str = '127.0.0.1:9090', timeout_s: float = 10.0,
                 retry: Optional[RetryPolicy] = None,
                 metadata: Optional[Dict[str, str]] = None,
                 max_message_bytes: int = 16 * 1024 * 1024,
                 channel: Optional[grpc.Channel] = None, *, ca_file: Optional[str] = None,
                 client_cert: Optional[str] = None, client_key: Optional[str] = None,
                 tls: bool = False, server_name: Optional[str] = None):
        if not isinstance(target, str):
            raise TypeError(f"target must be a str such as '127.0.0.1:9090', got "
                            f'{type(target).__name__}')
        if not target.strip():
            raise ValueError(f"target must name a server, such as '127.0.0.1:9090', got "
                             f'{target!r}')
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) or \
                max_message_bytes <= 0:
            raise ValueError(f'max_message_bytes must be a number of bytes > 0, got '
                             f'{max_message_bytes!r}')
        self.target = target
        self.timeout_s = check_timeout(timeout_s)
        self.retry = check_retry(retry) or RetryPolicy()
        self.metadata = _check_metadata(metadata)
        self._closed = False
        self._tls_files = None
        use_tls = bool(tls or ca_file or client_cert or client_key or server_name)
        if channel is not None and use_tls:
            raise ValueError('channel= is a ready channel: give TLS options (ca_file, '
                             'client_cert, client_key, tls, server_name) or a channel, not both')
        options = [
            ('grpc.max_receive_message_length', max_message_bytes),
            ('grpc.max_send_message_length', max_message_bytes),
            ('grpc.enable_retries', 0),   # retries are ours (backoff + jitter + Retry-After)
            # gRPC's own reconnect backoff grows to 120 s: after an outage of a minute our
            # retries all fell inside it ("failed to connect") for ~45 s after the server was
            # back. Reconnect attempts at most MAX_RECONNECT_BACKOFF_MS apart.
            ('grpc.max_reconnect_backoff_ms', MAX_RECONNECT_BACKOFF_MS),
            # (not min_reconnect_backoff_ms: gRPC also takes it as the least time a connection
            # attempt gets, and a TLS handshake over a slow link needs more than 100 ms)
            ('grpc.initial_reconnect_backoff_ms', INITIAL_RECONNECT_BACKOFF_MS),
        ]
        if channel is not None:
            self._channel = channel
        elif use_tls:
            check_tls_files(ca_file, client_cert, client_key)
            self._tls_files = (ca_file, client_cert, client_key, server_name)
            creds = grpc.ssl_channel_credentials(root_certificates=_read(ca_file),
                                                 private_key=_read(client_key),
                                                 certificate_chain=_read(client_cert))
            if server_name:
                options.append(('grpc.ssl_target_name_override', server_name))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.EmbeddingServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel; calls after this raise ``ValueError``."""
        self._closed = True
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError('GrpcClient is closed: make a new one')

    def _error(self, err: grpc.RpcError, request_id: str) -> AkidbError:
        out = error_from_rpc(err, request_id)
        if self._tls_files is not None and out.code == 'UNAVAILABLE' and \
                not isinstance(out, TLSError) and 'Socket closed' in out.message:
            # TLS 1.3: a server refusing our certificate (or its absence) closes the socket
            # after the handshake and gRPC says only "Socket closed"; one handshake of our own
            # hears the server's alert, which tells a refusal from an outage
            ca_file, client_cert, client_key, server_name = self._tls_files
            addr = _host_port(self.target)
            why = None if addr is None else probe_tls(addr, ca_file, True, client_cert,
                                                      client_key, server_name, alpn=['h2'])
            if why is not None:
                return TLSError(f'TLS with {self.target} failed: {why}', code='TLS_ERROR',
                                status=out.status, retryable=False,
                                request_id=out.request_id)
        return out

    def _budget(self, timeout_s: Optional[float]) -> float:
        self._check_open()
        return self.timeout_s if timeout_s is None else check_timeout(timeout_s)

    def _unary(self, method, request, timeout_s: Optional[float], retry: Optional[RetryPolicy],
               request_id: str, extra_metadata: Sequence[tuple] = ()):
        """The answer; ``method`` may be a ``with_call`` (then ``(answer, call)``)."""
        total = self._budget(timeout_s)
        retry = check_retry(retry)
        md = self.metadata + [('x-request-id', request_id), *extra_metadata]

        def attempt(remaining: Optional[float]):
            budget = total if remaining is None else remaining
            if budget <= 0:
                raise DeadlineExceededError('deadline exceeded before the call', code='TIMEOUT',
                                            request_id=request_id)
            try:
                return method(request, timeout=budget, metadata=md)
            except grpc.RpcError as err:
                raise self._error(err, request_id) from None
            except ValueError:      # "Cannot invoke RPC on closed channel!": close() raced us
                self._check_open()
                raise

        return call_with_retry(attempt, retry or self.retry, deadline_s=total)

    def embed(self, inputs: Sequence[str], model: str = '', normalize: bool = True,
              timeout_s: Optional[float] = None, request_id: Optional[str] = None,
              retry: Optional[RetryPolicy] = None, *, truncate: bool = True,
              input_type: Optional[str] = None) -> Embeddings:
        """Embed ``inputs`` (a str, or a sequence of str; bytes, sets, dicts and iterators are
        refused with TypeError).

        ``truncate=False``: an input over the model's max length is refused
        (``INPUT_TOO_LONG``) instead of cut; ``input_type`` (``none``, ``query``, ``passage``):
        the model's prompt prefix. Both go as request metadata (the PRD's message has no field
        for them); the answer's ``truncated_inputs`` comes from the trailing metadata.
        """
        texts = check_inputs(inputs)
        rid = check_embed_options(model, normalize, truncate, input_type, request_id) or \
            uuid.uuid4().hex
        md = _options_metadata(truncate, input_type)
        req = pb.EmbedRequest(model=model or '', inputs=texts, normalize=normalize)
        resp, call = self._unary(self.stub.Embed.with_call, req, timeout_s, retry, rid, md)
        trailing = {k: v for k, v in (call.trailing_metadata() or ())}
        return _to_embeddings(resp, len(texts), rid,
                              _md_number(trailing, TRUNCATED_MD, int) or 0)

    def embed_stream(self, batches: Iterable[Sequence[str]], model: str = '',
                     normalize: bool = True, timeout_s: Optional[float] = None, *,
                     truncate: bool = True, input_type: Optional[str] = None
                     ) -> Iterator[Embeddings]:
        """Send one EmbedRequest per batch over one bidi stream; yield answers in order.

        ``batches``: an iterable of batches, each a list of str (``[['a'], ['b', 'c']]``); a
        bare str batch is refused with ``TypeError`` (at once for a list or tuple, when it is
        reached for a generator). ``timeout_s`` (default: the client's) bounds the whole
        stream. No retry (a stream is not idempotent as a whole); the first error is raised,
        its ``stream_index`` saying which batch failed. ``truncate`` and ``input_type`` as in
        :meth:`embed`, for every batch; the answers' ``truncated_inputs`` stay 0 (the server
        reports only the stream's total, in its trailing metadata, once every answer is out):
        pass ``truncate=False`` to be told of an over-long input.
        """
        total = self._budget(timeout_s)
        check_embed_options(model, normalize, truncate, input_type)
        md = _options_metadata(truncate, input_type)
        if isinstance(batches, (str, bytes, bytearray)):
            raise TypeError('embed_stream takes an iterable of batches, each a list of str '
                            f"(e.g. [['hello', 'robot']]), not a bare {type(batches).__name__}")
        if isinstance(batches, (list, tuple)):
            checked = [_check_batch(b, i) for i, b in enumerate(batches)]
            return self._stream(iter(checked), model, normalize, total, [], md)
        refused: List[BaseException] = []

        def lazy():
            it = iter(batches)
            i = 0
            while True:
                try:
                    # the caller's own iterator, and the check of what it gives: gRPC's request
                    # thread swallowed an exception raised here, and the caller got a retryable
                    # INTERNAL 'Exception iterating requests!' for its own bug
                    b = next(it)
                    checked = _check_batch(b, i)
                except StopIteration:
                    return
                except Exception as exc:
                    refused.append(exc)     # end the stream here; raised once it is answered
                    return
                yield checked
                i += 1
        return self._stream(lazy(), model, normalize, total, refused, md)

    def _stream(self, batches: Iterator[List[str]], model: str, normalize: bool, total: float,
                refused: List[Exception], extra_metadata: List[tuple]) -> Iterator[Embeddings]:
        rid = uuid.uuid4().hex
        sizes: 'collections.deque[int]' = collections.deque()   # of the batches sent, in order

        def messages():
            for b in batches:
                sizes.append(len(b))
                yield pb.EmbedRequest(model=model or '', inputs=b, normalize=normalize)
        reqs = messages()
        try:
            call = self.stub.EmbedStream(
                reqs, timeout=total,
                metadata=self.metadata + [('x-request-id', rid), *extra_metadata])
        except ValueError:
            self._check_open()
            raise
        try:
            for i, resp in enumerate(call):
                try:
                    answer = _to_embeddings(resp, sizes.popleft() if sizes else 0, rid)
                except ProtocolError as err:
                    err.stream_index = i
                    raise
                yield answer
        except grpc.RpcError as err:
            if refused:             # the caller's iterator failed: its own exception
                raise refused[0] from None
            raise self._error(err, rid) from None
        finally:
            call.cancel()       # a caller that stops early ends the stream (no-op when done)
        if refused:
            raise refused[0]

    def list_models(self, timeout_s: Optional[float] = None) -> List[pb.ModelInfo]:
        return list(self._unary(self.stub.ListModels, pb.ListModelsRequest(), timeout_s, None,
                                uuid.uuid4().hex).models)

    def health(self, timeout_s: Optional[float] = None) -> pb.HealthResponse:
        return self._unary(self.stub.Health, pb.HealthRequest(), timeout_s, None,
                           uuid.uuid4().hex)

    def serving(self, service: str = '', timeout_s: float = 2.0) -> bool:
        """Ask the standard grpc.health.v1 service whether ``service`` is SERVING."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        timeout_s = self._budget(timeout_s)
        try:
            resp = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
        except ValueError:
            self._check_open()
            raise
        return resp.status == health_pb2.HealthCheckResponse.SERVING
