"""A minimal ``helm lint`` / ``helm template`` over Helm v4's Go SDK (helm-python-sdk).

Flags follow the helm CLI: ``-f/--values`` (repeatable, later wins), ``--set k=v`` (repeatable),
``-n/--namespace``, ``--strict`` (lint: warnings fail), ``--kube-version``. Exit status 1 on any
lint error (or warning with --strict) or render failure, like helm.
"""
from __future__ import annotations

import argparse
import sys

import yaml
import helm_python as helm


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _values(args) -> dict:
    vals: dict = {}
    for path in args.values or []:
        with open(path, encoding='utf-8') as fh:
            vals = _deep_merge(vals, yaml.safe_load(fh) or {})
    for expr in args.set or []:
        vals = _deep_merge(vals, helm.parse_set_string(expr))
    return vals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='helm')
    sub = ap.add_subparsers(dest='cmd', required=True)
    for name in ('lint', 'template'):
        p = sub.add_parser(name)
        if name == 'template':
            p.add_argument('release')
        p.add_argument('chart')
        p.add_argument('-f', '--values', action='append')
        p.add_argument('--set', action='append')
        p.add_argument('-n', '--namespace', default='default')
        p.add_argument('--kube-version', default='v1.31.0')
        if name == 'lint':
            p.add_argument('--strict', action='store_true')
    sub.add_parser('version')
    args = ap.parse_args(argv)
    if args.cmd == 'version':
        print(f'helm SDK {helm.helm_sdk_version()} (helm-c-sdk {helm.helm_c_version()})')
        return 0
    vals = _values(args)
    if args.cmd == 'lint':
        rep = helm.lint(args.chart, vals, strict=args.strict, namespace=args.namespace,
                        kube_version=args.kube_version)
        sev = {0: 'UNKNOWN', 1: 'INFO', 2: 'WARNING', 3: 'ERROR'}
        bad = 0
        for m in rep.get('messages') or []:
            level = sev.get(m.get('severity'), '?')
            print(f"[{level}] {m.get('path')}: {m.get('error')}")
            if m.get('severity') == 3 or (args.strict and m.get('severity') == 2):
                bad += 1
        for e in rep.get('errors') or []:
            print(f'[ERROR] {e}')
            bad += 1
        print(f"{rep.get('total_charts_linted', 0)} chart(s) linted, "
              f"{'1 chart(s) failed' if bad else '0 chart(s) failed'}")
        return 1 if bad else 0
    with helm.Chart.load(args.chart) as chart:
        chart.validate_schema(chart.merge_values(vals))
        out = chart.render(vals, name=args.release, namespace=args.namespace, is_install=True)
    for path in sorted(out):
        body = out[path]
        if not body.strip() or path.endswith('NOTES.txt'):
            continue
        sys.stdout.write(f'---\n# Source: {path}\n{body.rstrip()}\n')
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except helm.HelmError as exc:
        print(f'Error: {exc}', file=sys.stderr)
        sys.exit(1)
