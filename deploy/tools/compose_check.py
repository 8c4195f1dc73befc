"""Validate a Compose file against the Compose Specification (compose-spec: the Rust compose_spec
parser, strict about unknown keys and value types, plus its Pydantic model of the spec's JSON
schema). Variables are interpolated and YAML anchors/merge keys resolved first, as docker
compose does.

    .venv-deploy/bin/python deploy/tools/compose_check.py docker/docker-compose.yml
"""
import json
import os
import re
import sys

import yaml
from compose_spec import ComposeSpecification, PyCompose


_VAR = re.compile(r'\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}')


def interpolate(text: str, env=os.environ) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR-default} (before validation, like compose)."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ''), text)


def check(path: str) -> list:
    with open(path, encoding='utf-8') as fh:
        doc = yaml.safe_load(interpolate(fh.read()))
    doc = {k: v for k, v in doc.items() if not k.startswith('x-')}   # extension fields
    parsed = PyCompose.from_json(json.dumps(doc))                     # raises ValueError
    ComposeSpecification.model_validate(doc)                          # raises ValidationError
    return sorted(parsed.service_names())


if __name__ == '__main__':
    rc = 0
    for p in sys.argv[1:]:
        try:
            print(f'{p}: OK, services {", ".join(check(p))}')
        except Exception as exc:  # noqa: BLE001 - report any validation failure
            print(f'{p}: INVALID: {exc}')
            rc = 1
    sys.exit(rc)
