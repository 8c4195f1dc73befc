"""The OpenAPI 3.1 document served at ``/openapi.json``, built from ``schemas.py``."""
from __future__ import annotations

import copy

from akidb_ros import __version__
from akidb_ros.rest import schemas as s

_COMMON_ERRORS = {
    '400': 'Malformed JSON, schema violation, invalid input (INVALID_INPUT, INPUT_TOO_LONG) or '
           'an unknown model (MODEL_NOT_FOUND, as the PRD says; 404 on the OpenAI routes, as '
           "OpenAI's API answers)",
    '401': 'UNAUTHENTICATED (when a guard is configured)',
    '403': 'PERMISSION_DENIED (when a guard is configured)',
    '404': 'MODEL_UNAVAILABLE (in the catalogue, files not installed); on the OpenAI routes '
           'also MODEL_NOT_FOUND; an unknown path (NOT_FOUND)',
    '405': 'METHOD_NOT_ALLOWED: another method on this path (any method not declared here; '
           'the Allow header lists those that are)',
    '409': 'MODEL_IN_USE',
    '413': 'Body or input too large (INPUT_TOO_LARGE)',
    '415': 'UNSUPPORTED_MEDIA_TYPE: the body is not sent as JSON (Content-Type application/json '
           'or application/<x>+json; a charset parameter must be utf-8)',
    '429': 'RATE_LIMITED (Retry-After set)',
    '500': 'INTERNAL (a server bug; never a caller mistake)',
    '503': 'OVERLOADED / UNAVAILABLE / CIRCUIT_OPEN / MODEL_LOAD_FAILED (Retry-After set)',
    '504': 'TIMEOUT',
}

_REQUEST_ID = {
    'name': 'X-Request-ID', 'in': 'header', 'required': False,
    'schema': {'type': 'string'},
    'description': 'Echoed in the response (generated when absent or not '
                   '[A-Za-z0-9._:/+=-]{1,128})',
}


_TIMEOUT = {
    'name': 'X-Request-Timeout-Ms', 'in': 'header', 'required': False,
    'schema': {'type': 'number', 'exclusiveMinimum': 0},
    'description': "A budget for this call in milliseconds, above 0: never more than the "
                   "server's own (a longer one is capped to it, as a gRPC deadline is); a "
                   "budget the call cannot meet is 504 TIMEOUT",
}
_ALLOW = {'Allow': {'schema': {'type': 'string'},
                    'description': 'The methods of this path, e.g. "OPTIONS, POST"'}}
_405 = _COMMON_ERRORS['405']


def _options(op_id: str) -> dict:
    """``OPTIONS`` on a path: 204, no body, ``Allow`` (public, also behind the guard)."""
    return {'operationId': f'{op_id}_options', 'summary': 'The methods this path allows',
            'responses': {'204': {'description': 'No content; Allow lists the methods',
                                  'headers': _ALLOW}}}


def _with_options(paths: dict) -> dict:
    """Every path answers OPTIONS, and every operation declares the 405 of its path."""
    for item in paths.values():
        for op in list(item.values()):
            error_ref = op['responses'].get('400', {}).get('content', {}).get(
                'application/json', {}).get('schema', {}).get('$ref', '').rsplit('/', 1)[-1]
            op['responses'].setdefault('405', {'description': _405,
                                               'content': _json(error_ref or 'Error'),
                                               'headers': _ALLOW})
        op_id = next(iter(item.values()))['operationId']
        item['options'] = _options(op_id)
    return paths


def _json(schema_ref: str) -> dict:
    return {'application/json': {'schema': {'$ref': f'#/components/schemas/{schema_ref}'}}}


def _responses(ok_ref: str, ok_desc: str, errors=None, error_ref: str = 'Error') -> dict:
    out = {'200': {'description': ok_desc, 'content': _json(ok_ref),
                   'headers': {'X-Request-ID': {'schema': {'type': 'string'}}}}}
    for code in (errors or _COMMON_ERRORS):
        out[code] = {'description': _COMMON_ERRORS[code], 'content': _json(error_ref)}
        if code == '405':
            out[code]['headers'] = _ALLOW
    return out


def _guarded(responses: dict) -> dict:
    """A route the guard checks (every one but liveness): its refusals beside its answers."""
    for code in ('401', '403', '429'):
        responses[code] = {'description': _COMMON_ERRORS[code], 'content': _json('Error')}
    return responses


def build_openapi(server_url: str = '') -> dict:
    embed_errors = list(_COMMON_ERRORS)
    admin_errors = list(_COMMON_ERRORS)
    doc = {
        'openapi': '3.1.0',
        'info': {
            'title': 'akidb_ros REST bridge',
            'version': __version__,
            'description': 'Text embeddings for robots and non-ROS clients. Errors are '
                           '`{error, code}` with the status from the one error table; on the '
                           'OpenAI-compatible routes (`/v1/...`) every error, the guard\'s and '
                           'the server\'s included, has OpenAI\'s shape `{"error": {message, '
                           'type, param, code}, "code"}`. Every path answers OPTIONS with 204 '
                           'and `Allow`, and any undeclared method with 405 and `Allow`.',
        },
        'paths': {
            '/api/v1/embed': {'post': {
                'operationId': 'embed', 'summary': 'Embed texts',
                'parameters': [_REQUEST_ID, _TIMEOUT],
                'requestBody': {'required': True, 'content': _json('EmbedRequest')},
                'responses': _responses('EmbedResponse', 'Embeddings, in input order',
                                        embed_errors),
            }},
            '/v1/embeddings': {'post': {
                'operationId': 'openai_embeddings', 'summary': 'OpenAI-compatible embeddings',
                'parameters': [_REQUEST_ID, _TIMEOUT],
                'requestBody': {'required': True, 'content': _json('OpenAIEmbeddingRequest')},
                'responses': _responses('OpenAIEmbeddingResponse', 'OpenAI embedding list',
                                        embed_errors, error_ref='OpenAIError'),
            }},
            '/models': {'get': {
                'operationId': 'list_models', 'summary': 'Every model the engine knows',
                'responses': _responses('ModelsResponse', 'Model list',
                                        ['401', '403', '429', '503', '504']),
            }},
            '/admin/models/load': {'post': {
                'operationId': 'load_model', 'summary': 'Load (and warm) a model',
                'requestBody': {'required': True, 'content': _json('AdminModelRequest')},
                'responses': _responses('AdminResponse', 'The loaded model', admin_errors),
            }},
            '/admin/models/unload': {'post': {
                'operationId': 'unload_model', 'summary': 'Unload a model (waits for its work)',
                'requestBody': {'required': True, 'content': _json('AdminModelRequest')},
                'responses': _responses('AdminResponse', 'The unloaded model', admin_errors),
            }},
            '/health': {'get': {
                'operationId': 'health', 'summary': 'PRD health (503 when unhealthy)',
                'responses': _guarded({
                    '200': {'description': 'healthy or degraded', 'content': _json('Health')},
                    '503': {'description': 'unhealthy', 'content': _json('Health')},
                }),
            }},
            '/health/live': {'get': {
                'operationId': 'live', 'summary': 'Liveness probe',
                'responses': {'200': {'description': 'alive', 'content': _json('Probe')}},
            }},
            '/health/ready': {'get': {
                'operationId': 'ready', 'summary': 'Readiness: the default model is loaded',
                'responses': _guarded({
                    '200': {'description': 'ready', 'content': _json('Probe')},
                    '503': {'description': 'not ready', 'content': _json('Probe')}}),
            }},
            '/metrics': {'get': {
                'operationId': 'metrics', 'summary': 'Prometheus metrics (text format)',
                'responses': _guarded({'200': {'description': 'metrics', 'content': {
                    'text/plain': {'schema': {'type': 'string'}}}}}),
            }},
            '/openapi.json': {'get': {
                'operationId': 'openapi', 'summary': 'This document (OpenAPI 3.1)',
                'responses': _guarded({'200': {'description': 'the OpenAPI document',
                                               'content': {'application/json': {
                                                   'schema': {'type': 'object'}}}}}),
            }},
        },
        'components': {'schemas': {
            'EmbedRequest': s.EMBED_REQUEST, 'EmbedResponse': s.EMBED_RESPONSE,
            'OpenAIEmbeddingRequest': s.OPENAI_REQUEST,
            'OpenAIEmbeddingResponse': s.OPENAI_RESPONSE,
            'AdminModelRequest': s.ADMIN_MODEL_REQUEST, 'AdminResponse': s.ADMIN_RESPONSE,
            'ModelsResponse': s.MODELS_RESPONSE, 'Health': s.HEALTH_RESPONSE,
            'Probe': s.PROBE_RESPONSE, 'Error': s.ERROR, 'OpenAIError': s.OPENAI_ERROR,
        }},
    }
    _with_options(doc['paths'])
    if server_url:
        doc['servers'] = [{'url': server_url}]
    return copy.deepcopy(doc)
