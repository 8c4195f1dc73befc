"""``make setup`` skips a model export only while its files match the checksums of its
``VERIFIED`` record (scripts/export_models.py): a truncated model.onnx, a deleted tokenizer.json
or cut weights were reported "already exported and verified" and left broken."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINILM = ROOT / 'models' / 'all-MiniLM-L6-v2'
spec = importlib.util.spec_from_file_location('export_models',
                                              ROOT / 'scripts' / 'export_models.py')
export_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_models)


@pytest.fixture
def exported(tmp_path):
    """A copy of the installed MiniLM export (its real files) and its VERIFIED record."""
    out = tmp_path / 'all-MiniLM-L6-v2'
    out.mkdir()
    for name in export_models.VERIFIED_FILES:
        shutil.copy(MINILM / name, out / name)
    return out


def test_the_installed_exports_record_every_file_and_match():
    for folder in ('all-MiniLM-L6-v2', 'all-mpnet-base-v2'):
        info = json.loads((ROOT / 'models' / folder / 'VERIFIED').read_text())
        assert info['format'] == export_models.EXPORT_FORMAT
        assert sorted(info['files']) == sorted(export_models.VERIFIED_FILES)
        assert export_models.damage(ROOT / 'models' / folder, info) == []


@pytest.mark.parametrize('harm, said', [
    (lambda out: (out / 'tokenizer.json').unlink(), 'tokenizer.json is missing'),
    (lambda out: (out / 'model.onnx.data').write_bytes(
        (out / 'model.onnx.data').read_bytes()[:40_000_000]),
     'model.onnx.data has 40000000 bytes'),
    (lambda out: (out / 'model.onnx').write_bytes(
        bytes(reversed((out / 'model.onnx').read_bytes()))), 'model.onnx does not match'),
])
def test_a_damaged_file_is_found_and_the_export_redone(exported, harm, said):
    info = {'format': export_models.EXPORT_FORMAT, 'files': export_models.file_records(exported)}
    (exported / 'VERIFIED').write_text(json.dumps(info))
    assert export_models.damage(exported, info) == []

    def never(tmp):
        raise AssertionError('an intact export was redone')
    assert export_models.build_one(exported.name, never, exported.parent, force=False) == info
    harm(exported)
    assert export_models.damage(exported, info)[0].startswith(said)

    class Redone(Exception):
        pass

    def export_again(tmp):          # where build_one would start the export from PyPI files
        raise Redone
    with pytest.raises((Redone, ImportError)):      # ImportError: no sentence-transformers here
        export_models.build_one(exported.name, export_again, exported.parent, force=False)
