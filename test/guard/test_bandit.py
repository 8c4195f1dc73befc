"""bandit over the guard package and the security scripts: no medium or high findings."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bandit_guard_clean():
    pytest.importorskip('bandit')
    r = subprocess.run([sys.executable, '-m', 'bandit', '-q', '-r', '-f', 'json', '-ll',
                        'akidb_ros/guard'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = json.loads(r.stdout)
    findings = [(x['filename'], x['line_number'], x['test_id'], x['issue_severity'])
                for x in report['results']]
    assert findings == [], findings
