"""Repo-wide lint, like ament_flake8 (settings in setup.cfg: 99 columns)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flake8_whole_repository():
    out = subprocess.run([sys.executable, '-m', 'flake8', '.'], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
