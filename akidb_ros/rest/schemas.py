"""JSON Schemas of the REST bridge.

Requests are validated with them (jsonschema), and the OpenAPI document (``/openapi.json``) is
built from the very same dicts, so the two cannot drift.
"""
from __future__ import annotations

MODEL_ID = {'type': 'string', 'maxLength': 256,
            'description': "Model id or name; empty or omitted = the server's default model"}

EMBED_REQUEST = {
    'type': 'object',
    'additionalProperties': False,
    'required': ['inputs'],
    'properties': {
        'model': MODEL_ID,
        # no minLength on the texts: the engine refuses empty and blank texts after it checks
        # the count, so a request both too long and holding '' gets the same code on every door
        'inputs': {'type': 'array', 'minItems': 1,
                   'items': {'type': 'string'},
                   'description': 'Texts to embed (one vector per input, in order); empty or '
                                  'blank texts, or texts holding U+0000, are refused '
                                  'INVALID_INPUT'},
        'normalize': {'type': 'boolean', 'default': True,
                      'description': 'L2-normalise the vectors (default true)'},
        'truncate': {'type': 'boolean', 'default': True,
                     'description': "Cut over-long inputs at the model's max_tokens (counted in "
                                    'usage.truncated_inputs); false: INPUT_TOO_LONG instead'},
        'input_type': {'enum': ['none', 'query', 'passage'], 'default': 'none',
                       'description': "Prompt prefix for models that use one (E5's query:/"
                                      'passage:)'},
    },
}

USAGE = {
    'type': 'object',
    'required': ['total_tokens', 'duration_ms'],
    'properties': {
        'total_tokens': {'type': 'integer', 'minimum': 0},
        'duration_ms': {'type': 'integer', 'minimum': 0},
        'truncated_inputs': {'type': 'integer', 'minimum': 0},
    },
}

EMBED_RESPONSE = {
    'type': 'object',
    'required': ['embeddings', 'model', 'usage'],
    'properties': {
        'embeddings': {'type': 'array', 'items': {'type': 'array', 'items': {'type': 'number'}}},
        'model': {'type': 'string'},
        'usage': USAGE,
    },
}

OPENAI_REQUEST = {
    'type': 'object',
    'additionalProperties': True,     # OpenAI SDKs may send fields we ignore (e.g. user)
    'required': ['input', 'model'],
    'properties': {
        'input': {'oneOf': [
            {'type': 'string', 'minLength': 1},
            {'type': 'array', 'minItems': 1, 'items': {'type': 'string', 'minLength': 1}},
        ], 'description': 'A string or a list of strings (token arrays are not supported)'},
        'model': {'type': 'string', 'maxLength': 256},
        'encoding_format': {'enum': ['float', 'base64'], 'default': 'float'},
        'dimensions': {'type': 'integer', 'minimum': 1,
                       'description': "Must equal the model's dimension when given"},
        'user': {'type': 'string'},
    },
}

OPENAI_RESPONSE = {
    'type': 'object',
    'required': ['object', 'data', 'model', 'usage'],
    'properties': {
        'object': {'const': 'list'},
        'data': {'type': 'array', 'items': {
            'type': 'object', 'required': ['object', 'index', 'embedding'],
            'properties': {
                'object': {'const': 'embedding'},
                'index': {'type': 'integer', 'minimum': 0},
                'embedding': {'oneOf': [{'type': 'array', 'items': {'type': 'number'}},
                                        {'type': 'string'}]},
            }}},
        'model': {'type': 'string'},
        'usage': {'type': 'object', 'required': ['prompt_tokens', 'total_tokens'],
                  'properties': {'prompt_tokens': {'type': 'integer', 'minimum': 0},
                                 'total_tokens': {'type': 'integer', 'minimum': 0}}},
    },
}

ADMIN_MODEL_REQUEST = {
    'type': 'object',
    'additionalProperties': False,
    'required': ['model'],
    'properties': {'model': {'type': 'string', 'minLength': 1, 'maxLength': 256}},
}

ERROR = {
    'type': 'object',
    'required': ['error', 'code'],
    'properties': {
        'error': {'type': 'string'},
        'code': {'type': 'string',
                 'description': 'Code from the error table (INVALID_INPUT, ...)'},
        'request_id': {'type': 'string'},
    },
}

OPENAI_ERROR = {
    'type': 'object',
    'required': ['error', 'code'],
    'properties': {
        'error': {'type': 'object', 'required': ['message', 'type', 'code'],
                  'properties': {'message': {'type': 'string'}, 'type': {'type': 'string'},
                                 'code': {'type': 'string'}, 'param': {}}},
        'code': {'type': 'string'},
    },
}

MODEL_INFO = {
    'type': 'object',
    'required': ['id', 'name', 'dimension', 'params', 'memory_mb', 'latency_p95_ms',
                 'throughput_qps', 'status'],
    'properties': {
        'id': {'type': 'string'},
        'name': {'type': 'string'},
        'dimension': {'type': 'integer'},
        'params': {'type': 'integer'},
        'memory_mb': {'type': 'integer'},
        'latency_p95_ms': {'type': 'integer'},
        'throughput_qps': {'type': 'integer'},
        'status': {'enum': ['loaded', 'available', 'loading', 'failed', 'unavailable']},
        'max_tokens': {'type': 'integer'},
        'provider': {'type': 'string'},
        'pooling': {'type': 'string'},
        'is_default': {'type': 'boolean'},
        'error': {'type': 'string'},
    },
}

MODELS_RESPONSE = {
    'type': 'object',
    'required': ['models'],
    'properties': {'models': {'type': 'array', 'items': MODEL_INFO},
                   'default_model': {'type': 'string'}},
}

ADMIN_RESPONSE = {
    'type': 'object', 'required': ['model'], 'properties': {'model': MODEL_INFO},
}

HEALTH_RESPONSE = {
    'type': 'object',
    'required': ['status', 'checks', 'version'],
    'properties': {
        'status': {'enum': ['healthy', 'degraded', 'unhealthy']},
        'checks': {'type': 'object', 'required': ['embedding_provider', 'model_cache', 'gpu'],
                   'additionalProperties': {'type': 'string'}},
        'version': {'type': 'string'},
        'mode': {'type': 'string'},
        'provider': {'type': 'string'},
        'default_model': {'type': 'string'},
    },
}

PROBE_RESPONSE = {
    'type': 'object', 'required': ['status'],
    'properties': {'status': {'type': 'string'}, 'error': {'type': 'string'},
                   'code': {'type': 'string'}},
}
