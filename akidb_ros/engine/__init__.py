"""The core embedding engine: no ROS, HTTP or gRPC imports (see docs/engine-api.md)."""
from .config import ConfigError, EngineConfig, load_config
from .engine import EmbeddingEngine
from .errors import EngineError, ErrorCode
from .types import (EmbedRequest, EmbedResult, HealthInfo, InputType, ModelInfo, ModelStatus,
                    Priority)

__all__ = [
    'ConfigError', 'EmbedRequest', 'EmbedResult', 'EmbeddingEngine', 'EngineConfig',
    'EngineError', 'ErrorCode', 'HealthInfo', 'InputType', 'ModelInfo', 'ModelStatus',
    'Priority', 'load_config',
]
