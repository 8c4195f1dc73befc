"""The Flask REST bridge: parse → validate (JSON Schema) → guard → backend → render.

Thin by design: every answer and every error comes from the backend and the one error table.
Served by ``akidb_ros.rest.server`` (httptools-parsed, a thread per connection), never by the
Flask development server.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
from typing import Any, Dict, Optional, Tuple

import jsonschema
import jsonschema_rs
from flask import Flask, Response, g, request
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from werkzeug.exceptions import HTTPException, NotFound, RequestEntityTooLarge

from akidb_ros.backends import Backend, wait_result
from akidb_ros.doors import (REQUEST_ID_HEADER, DoorCall, GuardHook, ModelLabels,
                             caller_deadline, log_level_of, record, record_refusal,
                             request_id_from, run_guard, server_cut)
from akidb_ros.engine.errors import EngineError, ErrorCode
from akidb_ros.engine.types import EmbedRequest, InputType, ModelInfo, ModelStatus
from akidb_ros.observability import metrics as m
from akidb_ros.observability.logs import log_request
from akidb_ros.observability.tracing import extract_from_headers, tracer
from akidb_ros.rest import schemas
from akidb_ros.rest.openapi import build_openapi
from akidb_ros.rest.wsgi_server import CALLER_GONE, SERVER_CUT

log = logging.getLogger('akidb_ros.rest')

try:   # float32 vectors straight to JSON (shortest float32 repr, exact round trip), ~25x json
    import numpy as np
    import orjson

    def _dumps(obj) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    def _vectors(emb):
        return np.ascontiguousarray(emb, dtype=np.float32)
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    def _dumps(obj) -> bytes:
        return json.dumps(obj).encode()

    def _vectors(emb):
        return emb.tolist()

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
TRANSPORT = 'rest'
_INFLIGHT = m.INFLIGHT_REQUESTS.labels(TRANSPORT)
EMBED_ROUTES = frozenset((('POST', '/api/v1/embed'), ('POST', '/v1/embeddings')))
_HTTP_CODES = {404: ErrorCode.NOT_FOUND.name, 405: ErrorCode.METHOD_NOT_ALLOWED.name,
               413: ErrorCode.INPUT_TOO_LARGE.name, 415: ErrorCode.UNSUPPORTED_MEDIA_TYPE.name}


class _Validator:
    """One request schema, checked by two libraries: jsonschema-rs (compiled, ~0.2 µs a body,
    100x jsonschema here) says whether a body is valid; only an invalid body is walked again by
    jsonschema, whose ``best_match`` picks the error the caller is told (stable messages)."""

    def __init__(self, schema: dict):
        jsonschema.Draft202012Validator.check_schema(schema)
        self._fast = jsonschema_rs.Draft202012Validator(schema)
        self._explain = jsonschema.Draft202012Validator(schema)

    def first_error(self, body) -> Optional[jsonschema.ValidationError]:
        try:
            if self._fast.is_valid(body):
                return None
        except Exception:   # a value the compiled validator cannot take: jsonschema decides
            pass
        return jsonschema.exceptions.best_match(self._explain.iter_errors(body))


_VALIDATORS = {
    'embed': _Validator(schemas.EMBED_REQUEST),
    'openai': _Validator(schemas.OPENAI_REQUEST),
    'admin': _Validator(schemas.ADMIN_MODEL_REQUEST),
}


def json_media_type_error(content_type: str) -> Optional[str]:
    """Why a request's ``Content-Type`` does not announce a JSON body (None when it does).

    JSON is ``application/json`` or a structured ``application/<x>+json`` type (RFC 6839, as
    Flask's ``is_json``), any case, with parameters; a ``charset`` parameter must say UTF-8,
    the only encoding of JSON (RFC 8259 §8.1). Checked before the app reads the body: a browser's
    "simple" cross-origin POST (form or ``text/plain``, sent without a CORS preflight) never
    reaches a handler. A header comparison in the common case, no parser.
    """
    if content_type == 'application/json':
        return None
    mtype, _, params = content_type.partition(';')
    mtype = mtype.strip().lower()
    if mtype != 'application/json' and not (mtype.startswith('application/')
                                            and mtype.endswith('+json')):
        got = f', not {content_type[:100]!r}' if content_type else ' (none was sent)'
        return f'Content-Type must be application/json{got}'
    for param in params.split(';'):
        name, _, value = param.partition('=')
        if name.strip().lower() == 'charset' and \
                value.strip().strip('"').lower() not in ('utf-8', 'utf8'):
            return f'JSON bodies are UTF-8: charset {value.strip()[:40]!r} is not supported'
    return None


def disable_redirects(app: Flask) -> None:
    """Match paths exactly as sent: no slash merging, no redirects.

    werkzeug's slash merging and default redirects answer with an HTML 308 that no error
    handler sees (Flask returns routing redirects as they are), so ``/api/v1//embed`` is a JSON
    404 instead, and so is ``//api/v1/embed``. Call before any route is added: a rule takes the
    map's settings then.
    """
    app.url_map.merge_slashes = False
    app.url_map.redirect_defaults = False

    @app.url_value_preprocessor
    def _exact_leading_slash(endpoint, values) -> None:
        # werkzeug strips a path's leading slashes before matching (``//models`` is
        # ``/models``): refused here, after routing and before any before_request hook
        if request.environ.get('PATH_INFO', '').startswith('//'):
            raise NotFound()


def _schema_error(err: jsonschema.ValidationError) -> str:
    path = '.'.join(str(p) if not isinstance(p, int) else f'[{p}]' for p in err.absolute_path)
    path = path.replace('.[', '[')
    msg = err.message
    if len(msg) > 300:
        msg = msg[:300] + '…'
    return f'{path or "body"}: {msg}'


_REQUEST_ID_KEY = REQUEST_ID_HEADER.lower()
_MILLISECONDS = re.compile(r'[0-9]+(\.[0-9]+)?')
MAX_BUDGET_S = 600.0        # a call's budget when the app has no server budget of its own


def lower_headers(environ: Dict[str, Any]) -> Dict[str, str]:
    """The request's headers, names lower-cased, straight from the WSGI environ: what the guard,
    the trace propagator and the door read, built once a request (a quarter of werkzeug's
    ``request.headers`` walk; the server drops names with ``_``, so the mapping is exact)."""
    headers = {k[5:].replace('_', '-').lower(): v for k, v in environ.items()
               if k.startswith('HTTP_')}
    for key, name in (('CONTENT_TYPE', 'content-type'), ('CONTENT_LENGTH', 'content-length')):
        if environ.get(key):
            headers[name] = environ[key]
    return headers


def _model_json(mi: ModelInfo) -> Dict[str, Any]:
    status = mi.status.value if isinstance(mi.status, ModelStatus) else str(mi.status)
    return {
        'id': mi.id, 'name': mi.name, 'dimension': int(mi.dimension), 'params': int(mi.params),
        'memory_mb': int(mi.memory_mb), 'latency_p95_ms': int(round(mi.latency_p95_ms or 0)),
        'throughput_qps': int(round(mi.throughput_qps or 0)), 'status': status,
        'max_tokens': int(mi.max_tokens), 'provider': mi.provider or '',
        'pooling': mi.pooling or '', 'is_default': bool(mi.is_default), 'error': mi.error or '',
    }


# -- responses shared by the REST door and the probe listener (akidb_ros.rest.probe) -----------
# One definition each, so the probe port answers exactly what the REST door answers.

def json_response(body: Dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype='application/json')


# -- the error shape, decided by route in this one place ---------------------------------------
OPENAI_PREFIX = '/v1/'


def is_openai_path(path: str) -> bool:
    """Whether ``path`` is on the OpenAI-compatible surface (``/v1/...``, the SDKs' base URL),
    whose every error, from the app, the guard or the server itself, has OpenAI's shape."""
    return path.startswith(OPENAI_PREFIX)


def error_body(path: str, code: ErrorCode, message: str,
               param: Optional[str] = None) -> Dict[str, Any]:
    """The error document of a refusal on ``path``: ``{error, code}``, or on the OpenAI routes
    ``{"error": {message, type, param, code}, "code"}`` (the table code in both places)."""
    if is_openai_path(path):
        return {'error': {'message': message, 'type': _openai_type(code), 'param': param,
                          'code': code.name}, 'code': code.name}
    return {'error': message, 'code': code.name}


def error_bytes(path: str, code: ErrorCode, message: str) -> bytes:
    """``error_body`` as JSON bytes (the WSGI server's own refusals: 400, 405, 413, 431)."""
    return json.dumps(error_body(path, code, message)).encode()


# Where OpenAI's API answers another status than the PRD's table, its SDKs expect OpenAI's: an
# unknown model is their 404 (``NotFoundError``), the PRD's 400 elsewhere.
OPENAI_STATUS = {ErrorCode.MODEL_NOT_FOUND: 404}


def http_status(code: ErrorCode, path: str) -> int:
    """The HTTP status of ``code`` on ``path``: the error table's, OpenAI's on its routes."""
    if is_openai_path(path):
        return OPENAI_STATUS.get(code, code.http_status)
    return code.http_status


def engine_error_response(err: EngineError, path: str) -> Response:
    """An EngineError as a response on ``path``: status from the table (``http_status``),
    ``Retry-After`` on retryable 429/503s and ``err.headers`` (X-RateLimit-*). ``err.param``
    (when set) names the request field on the OpenAI routes."""
    body = error_body(path, err.code, err.message, getattr(err, 'param', None))
    resp = Response(json.dumps(body), status=http_status(err.code, path),
                    mimetype='application/json')
    if err.retry_after_s is not None or (err.code.retryable
                                         and err.code.http_status in (429, 503)):
        resp.headers['Retry-After'] = str(max(1, math.ceil(err.retry_after_s or 1)))
    # door-level refusals (429) carry X-RateLimit-*; never override Retry-After above
    for k, v in (getattr(err, 'headers', None) or {}).items():
        resp.headers.setdefault(k, v)
    return resp


def http_error(status: int, message: str, code: str, path: str = '') -> Response:
    """The error body (by route, see ``error_body``) of a refusal before any handler runs."""
    try:
        ecode = ErrorCode[code]
    except KeyError:
        ecode = ErrorCode.INTERNAL
    return json_response(error_body(path, ecode, message), status)


def http_exception_response(exc: HTTPException, path: str = '') -> Response:
    """Werkzeug's routing/parsing errors (404, 405, 413, ...) in the service's error shape."""
    code = _HTTP_CODES.get(exc.code, 'INVALID_INPUT' if 400 <= (exc.code or 0) < 500
                           else ErrorCode.INTERNAL.name)
    resp = http_error(exc.code or 500, exc.description or exc.name, code, path)
    if getattr(exc, 'valid_methods', None):     # a 405 says what is allowed (RFC 9110)
        resp.headers['Allow'] = ', '.join(exc.valid_methods)
    return resp


def live_response() -> Response:
    """``GET /health/live``: the process serves HTTP."""
    return json_response({'status': 'alive'})


def ready_response(backend: Backend) -> Response:
    """``GET /health/ready``: 200 when the backend answers and its default model is loaded."""
    if backend.ready():
        return json_response({'status': 'ready'})
    return json_response({'status': 'not_ready', 'code': ErrorCode.UNAVAILABLE.name,
                          'error': 'default model not loaded or backend unreachable'}, 503)


def metrics_response() -> Response:
    """``GET /metrics``: the Prometheus text exposition of this process' default registry."""
    return Response(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


class _RestFlask(Flask):
    """Flask whose automatic ``OPTIONS`` answer is ``204 No Content`` with ``Allow`` (Flask's
    own is a 200 with an empty ``text/html`` body)."""

    def make_default_options_response(self) -> Response:
        resp = super().make_default_options_response()
        resp.status_code = 204
        resp.headers.pop('Content-Type', None)
        return resp


def create_app(backend: Backend, guard: Optional[GuardHook] = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               default_timeout_s: Optional[float] = None) -> Flask:
    """Build the Flask app around a backend (LocalBackend or RosBackend)."""
    # no static folder: its /static/<path> route would be an undeclared (default-deny) route
    app = _RestFlask('akidb_ros.rest', static_folder=None)
    disable_redirects(app)          # /api/v1//embed is a JSON 404, not an HTML 308
    app.config['MAX_CONTENT_LENGTH'] = max_body_bytes
    app.json.sort_keys = False
    labels = ModelLabels(backend)
    openapi_doc = json.dumps(build_openapi())

    # -- helpers ------------------------------------------------------------------------------
    # the install_flask guard (akidb_ros.guard.integrations) renders its refusals with it too
    app.extensions['akidb_error_response'] = engine_error_response

    def error_response(err: EngineError) -> Response:
        return engine_error_response(err, request.path)

    def parse_body(kind: str) -> dict:
        media_error = json_media_type_error(request.environ.get('CONTENT_TYPE', ''))
        if media_error is not None:
            raise EngineError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, media_error)
        coding = request.environ.get('HTTP_CONTENT_ENCODING', '').strip().lower()
        if coding not in ('', 'identity'):
            # RFC 9110 §8.4.1: a gzip body read as JSON was a misleading "not UTF-8" 400, and
            # a coding on a plain body was ignored
            raise EngineError(ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                              f'Content-Encoding {coding[:40]!r} is not supported: send the '
                              'JSON body uncoded')
        try:
            raw = request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise EngineError(ErrorCode.INPUT_TOO_LARGE,
                              f'request body larger than {max_body_bytes} bytes') from None
        if not raw:
            raise EngineError(ErrorCode.INVALID_INPUT, 'request body is empty (JSON expected)')
        try:    # strictly UTF-8 (RFC 8259): json.loads(bytes) would also take UTF-16 and -32
            text = raw.decode('utf-8')
        except UnicodeDecodeError as exc:
            raise EngineError(ErrorCode.INVALID_INPUT,
                              f'JSON body is not UTF-8: {exc.reason} at byte {exc.start}') \
                from None
        if text[:1] == '\ufeff':
            text = text[1:]     # a UTF-8 byte-order mark, which RFC 8259 lets a parser ignore
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise EngineError(ErrorCode.INVALID_INPUT, f'malformed JSON: {exc}') from None
        except RecursionError:
            raise EngineError(ErrorCode.INVALID_INPUT,
                              'malformed JSON: nested too deeply') from None
        err = _VALIDATORS[kind].first_error(body)
        if err is not None:
            g.refused_body = body       # its model names the call's metric label still
            raise _invalid(_schema_error(err), _schema_param(err))
        return body

    def text_bytes(texts) -> int:
        # only counted here (for the guard): the engine (or the sidecar, before the DDS hop)
        # refuses bad texts, lone surrogates included, after the count check, as on every door
        return sum(len(t.encode('utf-8', 'surrogatepass')) for t in texts)

    def check_model(model: str) -> None:
        _utf8_len(model, 'model', param='model')

    dim_cache: Dict[str, Any] = {'at': -1e9, 'dims': {}}

    def model_dimension(model_id: str) -> int:
        """A model's dimension from the backend's model list (its catalogue entry, known before
        the model is loaded), cached 30 s; 0 when unknown (then checked on the answer)."""
        now = time.monotonic()
        dims, age = dim_cache['dims'], now - dim_cache['at']
        if age > 30.0 or (model_id not in dims and age > 1.0):
            try:
                dims = {mi.id: int(mi.dimension or 0) for mi in backend.list_models()}
            except Exception:   # backend unreachable: the call itself will say so
                pass
            dim_cache.update(at=now, dims=dims)
        return dims.get(model_id, 0)

    def check_dimensions(wanted: Optional[int], model_id: str, dimension: int) -> None:
        if wanted is not None and dimension and wanted != dimension:
            raise _invalid(f'dimensions={wanted}: model {model_id} has {dimension} '
                           '(reduction is not supported)', 'dimensions')

    def timeout_from_header(call: DoorCall) -> Tuple[Optional[float], Optional[float]]:
        """``(budget, the caller's own ask)``: the ask capped to the server's budget, and as
        asked (EmbedRequest.caller_budget_s; None without the header)."""
        raw = g.headers.get('x-request-timeout-ms')
        if raw is None:
            return default_timeout_s, None
        try:
            if not _MILLISECONDS.fullmatch(raw):
                raise ValueError(raw)     # float() also takes '1_000', 'nan', '1e3', ' 5 '
            ms = float(raw)
        except ValueError:
            raise EngineError(ErrorCode.INVALID_INPUT,
                              'X-Request-Timeout-Ms must be a number of milliseconds') from None
        if not ms > 0:
            raise EngineError(ErrorCode.INVALID_INPUT, 'X-Request-Timeout-Ms must be above 0')
        # the caller may ask for less time than the server's per-request budget, never more: a
        # longer budget is capped to it, as a gRPC deadline is (it was refused here, 400)
        call.caller_deadline = caller_deadline(ms / 1000.0, default_timeout_s)
        cap = MAX_BUDGET_S if default_timeout_s is None else default_timeout_s
        return min(ms / 1000.0, cap), min(ms / 1000.0, MAX_BUDGET_S)

    def do_embed(call: DoorCall, req: EmbedRequest):
        """Run the guard, then the backend, inside the transport span."""
        done = run_guard(guard, call)
        if call.priority is not None:
            req.priority = call.priority      # admin callers: the engine's priority lane
        err: Optional[EngineError] = None
        try:
            fut = backend.submit(req, caller_waits=True)   # we wait
            # a client that closes its connection meanwhile: its work is dropped (CANCELLED)
            return wait_result(fut, req.timeout_s, request.environ.get(CALLER_GONE),
                               getattr(backend, 'cancel', None))
        except EngineError as e:
            err = e
            cut = request.environ.get(SERVER_CUT)
            if e.code is ErrorCode.CANCELLED and cut is not None and cut():
                err = server_cut()
                raise err from None
            raise
        finally:
            if callable(done):
                done(err)

    def embed_common(kind: str) -> Tuple[Response, Optional[EngineError]]:
        openai = kind == 'openai'
        call = DoorCall(transport=TRANSPORT, operation='embed', request_id=g.request_id,
                        headers=g.headers,
                        peer=request.remote_addr or '')
        span = trace.get_current_span()
        model_label = labels.label('')      # until the body names a model: the default's
        body = None
        try:
            body = parse_body(kind)
            if openai:
                texts = body['input'] if isinstance(body['input'], list) else [body['input']]
                model = body['model']
                normalize, truncate, input_type = None, True, InputType.NONE
            else:
                texts = body['inputs']
                model = body.get('model', '') or ''
                normalize = body.get('normalize', True)
                truncate = body.get('truncate', True)
                input_type = InputType(body.get('input_type', 'none'))
            call.n_bytes = text_bytes(texts)
            call.n_inputs = len(texts)
            model_label = labels.label(model)   # 'unknown' for a name refused just below
            check_model(model)
            model = labels.resolve(model)
            # the breaker is keyed by the model that will really serve the call
            call.model = labels.breaker_key(model, backend_default_model())
            model_label = labels.label(model)
            # the model that will serve it (bounded, as on the metrics); then the one that did
            span.set_attribute('akidb.model', model_label)
            span.set_attribute('akidb.inputs', len(texts))
            timeout, ask = timeout_from_header(call)
            req = EmbedRequest(inputs=texts, model=model, normalize=normalize, truncate=truncate,
                               input_type=input_type, timeout_s=timeout, caller_budget_s=ask,
                               request_id=g.request_id, transport=TRANSPORT)
            if openai and body.get('dimensions') is not None:
                # before the work: the dimension is the catalogue's (the answer's is checked too)
                model_id = model or backend_default_model()
                check_dimensions(body['dimensions'], model_id, model_dimension(model_id))
            res = do_embed(call, req)
            model_label = labels.label(res.model)
            span.set_attribute('akidb.model', res.model)
            if openai:
                check_dimensions(body.get('dimensions'), res.model, res.dimension)
        except EngineError as e:
            if openai and body is not None:
                e = _openai_input_error(e, single=isinstance(body.get('input'), str))
            named = getattr(g, 'refused_body', None)
            if isinstance(named, dict) and isinstance(named.get('model'), str) and named['model']:
                model_label = labels.label(named['model'])  # named, refused: not the default's
            span.set_attribute('akidb.error_code', e.code.name)
            span.set_status(trace.StatusCode.ERROR, e.code.name)
            record(call, model_label, e)
            resp = error_response(e)
            resp.headers.update(call.response_headers or {})
            return resp, e
        if openai:
            fmt = body.get('encoding_format', 'float')
            if fmt == 'base64':
                data = [{'object': 'embedding', 'index': i,
                         'embedding': base64.b64encode(v.astype('<f4').tobytes()).decode('ascii')}
                        for i, v in enumerate(res.embeddings)]
            else:
                vecs = _vectors(res.embeddings)
                data = [{'object': 'embedding', 'index': i, 'embedding': vecs[i]}
                        for i in range(len(vecs))]
            out = {'object': 'list', 'data': data, 'model': res.model,
                   'usage': {'prompt_tokens': int(res.total_tokens),
                             'total_tokens': int(res.total_tokens)}}
        else:
            out = {'embeddings': _vectors(res.embeddings), 'model': res.model,
                   'usage': {'total_tokens': int(res.total_tokens),
                             'duration_ms': int(round(res.duration_ms)),
                             'truncated_inputs': int(res.truncated_inputs)}}
        record(call, model_label, None, tokens=int(res.total_tokens))
        resp = Response(_dumps(out), status=200, mimetype='application/json')
        resp.headers.update(call.response_headers or {})
        return resp, None

    def traced(name: str, fn):
        """Run ``fn`` inside the transport span, parented on the caller's W3C context."""
        ctx = extract_from_headers(g.headers)
        token = otel_context.attach(ctx)
        try:
            with tracer().start_as_current_span(
                    name, kind=trace.SpanKind.SERVER, attributes={
                        'http.request.method': request.method, 'url.path': request.path,
                        'akidb.transport': TRANSPORT, 'akidb.request_id': g.request_id,
                    }) as span:
                resp = fn()
                span.set_attribute('http.response.status_code', resp.status_code)
                return resp
        finally:
            otel_context.detach(token)

    def backend_default_model() -> str:
        try:
            return backend.default_model() or ''
        except Exception:   # backend unreachable: the call itself will say so
            return ''

    def guard_call(operation: str, model: str = '') -> Tuple[DoorCall, Any]:
        """Run the guard for a non-embed operation; returns (call, completion callback)."""
        call = DoorCall(transport=TRANSPORT, operation=operation, request_id=g.request_id,
                        headers=g.headers,
                        peer=request.remote_addr or '', model=model)
        return call, run_guard(guard, call)

    def simple_guard(operation: str, model: str = '') -> None:
        if guard is None:
            return
        _call, done = guard_call(operation, model)
        if callable(done):
            done(None)

    def server_refusal(environ, code: ErrorCode, message: str):
        """The REST server refused a request before this app saw it (a body over the limit by
        its declared length): it gets its request id, its access-log line and its count as
        the app's own refusal of such a body would (on the embed routes a failed embed call,
        labelled with the default model: the body naming any other was not read)."""
        headers = lower_headers(environ)
        rid = request_id_from(headers.get(_REQUEST_ID_KEY))
        err = EngineError(code, message)
        method, path = environ.get('REQUEST_METHOD', ''), environ.get('PATH_INFO', '')
        if (method, path) in EMBED_ROUTES:
            record(DoorCall(transport=TRANSPORT, operation='embed', request_id=rid,
                            headers=headers, peer=environ.get('REMOTE_ADDR', '')),
                   labels.label(''), err)
        else:
            record_refusal(TRANSPORT, rid, err, time.perf_counter(), route=f'{method} {path}')
        return ((REQUEST_ID_HEADER, rid),)

    app.extensions['akidb_server_refusal'] = server_refusal

    # -- hooks --------------------------------------------------------------------------------
    @app.before_request
    def _start():
        g.headers = lower_headers(request.environ)
        g.request_id = request_id_from(g.headers.get(_REQUEST_ID_KEY))
        g.t0 = time.perf_counter()
        _INFLIGHT.inc()

    @app.after_request
    def _finish(resp: Response):
        resp.headers[REQUEST_ID_HEADER] = getattr(g, 'request_id', '')
        return resp

    @app.teardown_request
    def _teardown(_exc):
        if hasattr(g, 't0'):
            _INFLIGHT.dec()

    @app.errorhandler(HTTPException)
    def _http_exc(exc: HTTPException):
        resp = http_exception_response(exc, request.path)
        if exc is request.routing_exception or not hasattr(g, 't0'):
            # a route or method that does not exist (a typo, a scanner; ``//models`` is refused
            # before the request hooks): no handler ran, so it gets its access-log line and its
            # count here, as the server's own refusals do
            if not hasattr(g, 'request_id'):
                g.request_id = request_id_from(lower_headers(request.environ).get(_REQUEST_ID_KEY))
            code = _HTTP_CODES.get(exc.code, ErrorCode.NOT_FOUND.name)
            record_refusal(TRANSPORT, g.request_id,
                           EngineError(ErrorCode[code], exc.description or exc.name),
                           getattr(g, 't0', time.perf_counter()),
                           route=f'{request.method} {request.environ.get("PATH_INFO", "")[:256]}')
        return resp

    @app.errorhandler(EngineError)
    def _engine_exc(exc: EngineError):
        return error_response(exc)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception('unhandled error', extra={'request_id': getattr(g, 'request_id', '')})
        return http_error(500, f'internal error ({type(exc).__name__}); request id '
                               f'{getattr(g, "request_id", "")}', ErrorCode.INTERNAL.name,
                          request.path)

    # -- routes -------------------------------------------------------------------------------
    @app.post('/api/v1/embed')
    def embed():
        return traced('POST /api/v1/embed', lambda: embed_common('embed')[0])

    @app.post('/v1/embeddings')
    def openai_embeddings():
        return traced('POST /v1/embeddings', lambda: embed_common('openai')[0])

    @app.get('/health')
    def health():
        simple_guard('health')
        try:
            h = backend.health()
        except EngineError as e:
            body = {'status': 'unhealthy', 'checks': {
                'embedding_provider': f'error: {e.message}', 'model_cache': 'unknown',
                'gpu': 'unknown'}, 'version': _version(), 'mode': backend.name}
            return Response(json.dumps(body), status=503, mimetype='application/json')
        body = {'status': h.status, 'checks': dict(h.checks), 'version': h.version or _version(),
                'mode': backend.name, 'provider': h.provider or '',
                'default_model': h.default_model or ''}
        return Response(json.dumps(body), status=503 if h.status == 'unhealthy' else 200,
                        mimetype='application/json')

    @app.get('/health/live')
    def live():
        return live_response()

    @app.get('/health/ready')
    def ready():
        simple_guard('ready')
        return ready_response(backend)

    @app.get('/models')
    def models():
        simple_guard('list_models')
        infos = backend.list_models()
        labels.refresh(force=True)
        default = next((mi.id for mi in infos if mi.is_default), '') or backend.default_model()
        return {'models': [_model_json(mi) for mi in infos], 'default_model': default}

    def admin(op: str):
        # guard BEFORE the body is read: an anonymous caller gets 401, not 400 (the guard logs
        # its own refusals)
        call, done = guard_call(op) if guard is not None else (None, None)
        t0 = time.perf_counter()
        err: Optional[EngineError] = None
        model = ''
        try:
            body = parse_body('admin')
            check_model(body['model'])
            model = labels.resolve(body['model'])
            if call is not None:
                call.model = model          # for the admin audit record
            with tracer().start_as_current_span(f'admin {op}', attributes={'akidb.model': model}):
                mi = (backend.load_model(model) if op == 'load_model'
                      else backend.unload_model(model))
        except EngineError as e:
            err = e
            raise
        finally:
            if callable(done):
                done(err)       # audits the admin action with its real outcome
            # one access line per admin call, a failed one too (the operator's trail)
            log_request(TRANSPORT, g.request_id, model[:256], (time.perf_counter() - t0) * 1000,
                        'success' if err is None else 'error', op=op,
                        code='' if err is None else err.code.name,
                        level=log_level_of(err))
        labels.refresh(force=True)
        return {'model': _model_json(mi)}

    @app.post('/admin/models/load')
    def load_model():
        return admin('load_model')

    @app.post('/admin/models/unload')
    def unload_model():
        return admin('unload_model')

    @app.get('/metrics')
    def metrics():
        simple_guard('metrics')
        return metrics_response()

    @app.get('/openapi.json')
    def openapi():
        simple_guard('openapi')
        return Response(openapi_doc, mimetype='application/json')

    return app


def _invalid(message: str, param: Optional[str] = None) -> EngineError:
    """INVALID_INPUT naming the request field (``param`` on the OpenAI routes)."""
    exc = EngineError(ErrorCode.INVALID_INPUT, message)
    exc.param = param
    return exc


def _utf8_len(text: str, field: str, param: Optional[str] = None) -> int:
    """Bytes of ``text`` in UTF-8; INVALID_INPUT for a lone surrogate (JSON allows it)."""
    try:
        return len(text.encode('utf-8'))
    except UnicodeEncodeError:
        raise _invalid(f'{field}: not valid Unicode (lone surrogate)', param) from None


_INPUT_INDEX = re.compile(r'\binputs\[(\d+)\]')
_MODEL_CODES = (ErrorCode.MODEL_NOT_FOUND, ErrorCode.MODEL_UNAVAILABLE)


def _openai_input_error(err: EngineError, single: bool) -> EngineError:
    """An error of a parsed OpenAI request in OpenAI's terms.

    The engine and the door name texts ``inputs[i]`` (the native field): here the field is
    ``input`` (``input[3]``, or ``input`` when a single string was sent), and ``param`` names
    it. Limits on the inputs (count, characters, total bytes: ``INPUT_TOO_LARGE``, 413 on the
    native route) are ``400 INVALID_INPUT``, as OpenAI answers a batch or input over its limits,
    so its SDKs raise ``BadRequestError``. A body over the byte limit, refused before it is
    parsed, stays 413.
    """
    msg = err.message
    names_input = 'inputs' in msg
    if names_input:
        msg = _INPUT_INDEX.sub('input' if single else r'input[\1]', msg)
    code = ErrorCode.INVALID_INPUT if err.code is ErrorCode.INPUT_TOO_LARGE else err.code
    if msg != err.message or code is not err.code:
        new = EngineError(code, msg, err.retry_after_s)
        if getattr(err, 'headers', None):
            new.headers = err.headers
        err = new
    if getattr(err, 'param', None) is None:
        if names_input or code is ErrorCode.INPUT_TOO_LONG or err.code is not code:
            err.param = 'input'
        elif err.code in _MODEL_CODES or msg.startswith('model '):    # e.g. a NUL in it
            err.param = 'model'
    return err


def _schema_param(err: jsonschema.ValidationError) -> Optional[str]:
    """The top-level request field a schema error is about (None for the body itself)."""
    if err.absolute_path:
        first = err.absolute_path[0]
        return first if isinstance(first, str) else None
    if err.validator == 'required' and isinstance(err.instance, dict):
        missing = [k for k in err.validator_value if k not in err.instance]
        return missing[0] if missing else None
    if err.validator == 'additionalProperties' and isinstance(err.instance, dict):
        extra = [k for k in err.instance if k not in (err.schema.get('properties') or {})]
        return extra[0] if extra else None
    return None


def _openai_type(code: ErrorCode) -> str:
    status = code.http_status
    if status == 429:
        return 'rate_limit_error'
    if status in (401,):
        return 'authentication_error'
    if status in (403,):
        return 'permission_error'
    if status < 500:
        return 'invalid_request_error'
    return 'server_error'


def _version() -> str:
    from akidb_ros import __version__
    return __version__
