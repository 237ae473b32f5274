"""The commands' shared layer (nfnets.cli), and checkpoint conversion and classification from the command line,
on a fake reference F0 checkpoint."""
import ast
import glob
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from configs import nfnet as nfnet_configs
from nfnets import checkpoint
from nfnets import cli
from scripts import classify
from scripts import convert_checkpoint
from tests import helpers
from tests.helpers import REPO_ROOT


# Commands that must run where the project's requirements are not installed: CI reads the tested versions before
# installing them, and the TPU launcher runs on the user's machine, which needs no JAX.
_STANDALONE_COMMANDS = ('scripts/tested_stack.py', 'scripts/launch_tpu_pod.py')


def _imported_modules(path):
  tree = ast.parse(open(path).read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def test_every_command_imports_the_cli_module():
  commands = [path for pattern in ('experiments/*.py', 'scripts/*.py')
              for path in sorted(glob.glob(os.path.join(REPO_ROOT, pattern)))
              if "__name__ == '__main__'" in open(path).read()]
  assert len(commands) >= 12  # train, eval, the ablation and the scripts
  assert not os.path.exists(os.path.join(REPO_ROOT, 'experiments', 'common.py'))
  for path in commands:
    imported = _imported_modules(path)
    relative = os.path.relpath(path, REPO_ROOT)
    assert not any(name.startswith('experiments.common') for name in imported), relative
    assert ('nfnets.cli' in imported) != (relative in _STANDALONE_COMMANDS), relative


def test_a_renamed_config_field_on_the_command_line_names_its_new_name(monkeypatch, capsys):
  monkeypatch.setattr(cli, '_GIVEN', dict(cli._GIVEN))  # parse_flags records what it saw there
  with pytest.raises(SystemExit) as exit_info:
    cli.parse_flags(['prog', '--config=configs/nfnet.py:tiny', '--config.optimizer.clipping=0.02'])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert error.count('\n') == 1 and error.startswith('error: bad command line: --config.optimizer.clipping was '
                                                      'renamed: use optimizer.agc_lambda')


def _run(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=300)


@pytest.fixture(scope='module')
def reference_file(tmp_path_factory):
  params = helpers.reference_params('F0', seed=5)
  path = helpers.write_reference_checkpoint(tmp_path_factory.mktemp('reference') / 'F0_haiku.npz', params)
  return str(path), params


@pytest.fixture(scope='module')
def converted(reference_file, tmp_path_factory):
  destination = str(tmp_path_factory.mktemp('converted') / 'F0')
  convert_checkpoint.convert(reference_file[0], destination)
  return destination


def test_conversion_keeps_every_weight_and_the_variant(reference_file, converted):
  loaded = checkpoint.read(converted)
  model_config, weight_sets = loaded.model_config, loaded.weight_sets
  assert (model_config['variant'], model_config['num_classes'], model_config['depths']) == ('F0', 1000, None)
  # The variant's published recipe comes with it: evaluated at F0's test resolution without a --config.
  assert loaded.config['data']['eval_resolution'] == 256 and loaded.kind == 'project'
  assert set(weight_sets) == {''}
  params, _ = weight_sets['']
  expected = reference_file[1]
  assert set(params) == set(expected)
  for module, leaves in expected.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(params[module][name], value)


def test_conversion_refuses_to_overwrite_and_reports_bad_input(reference_file, converted, tmp_path):
  before = sorted(os.listdir(converted))
  result = _run('scripts.convert_checkpoint', reference_file[0], converted)
  assert result.returncode == 1 and 'already exists' in result.stderr and result.stderr.count('\n') == 1
  assert sorted(os.listdir(converted)) == before
  evil = tmp_path / 'evil.npz'
  marker = tmp_path / 'hacked'
  evil.write_bytes(f'cos\nsystem\n(S"touch {marker}"\ntR.'.encode())
  result = _run('scripts.convert_checkpoint', str(evil), str(tmp_path / 'out'))
  assert result.returncode == 1, result.stderr
  assert result.stderr.startswith('error:') and 'os.system' in result.stderr and str(evil) in result.stderr
  assert result.stderr.count('\n') == 1
  assert not (tmp_path / 'out').exists() and not marker.exists()


def test_classify_gives_the_same_answer_from_the_pickle_and_the_conversion(reference_file, converted, tmp_path):
  paths = []
  for name in ('china.jpg', 'flower.jpg'):
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image(name)).save(buffer, format='JPEG')
    (tmp_path / name).write_bytes(buffer.getvalue())
    paths.append(str(tmp_path / name))
  # A small evaluation resolution keeps the full-size F0 cheap on CPU.
  config = nfnet_configs.get_config('F0')
  config.data.eval_resolution, config.data.eval_resize_margin = 32, 0
  from_pickle = classify.classify(paths, checkpoint.read(reference_file[0]), config, top=3)
  from_conversion = classify.classify(paths, checkpoint.read(converted), config, top=3)
  assert from_pickle == from_conversion
  assert [r['image'] for r in from_pickle] == paths
  for result in from_pickle:
    probabilities = result['probabilities']
    assert len(result['top_classes']) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0 + 1e-6


def test_a_config_that_contradicts_the_checkpoint_is_refused(reference_file, tmp_path):
  image = tmp_path / 'digit.png'
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  result = _run('scripts.classify', str(image), '--checkpoint', reference_file[0], '--config', 'configs/nfnet.py:F1')
  assert result.returncode == 1
  assert result.stderr.startswith('error: --config does not describe the model in') and "variant 'F1' vs 'F0'" in (
      result.stderr) and result.stderr.count('\n') == 1
  result = _run('scripts.classify', str(tmp_path / 'missing.jpg'), '--checkpoint', reference_file[0])
  assert result.returncode == 1 and 'no image file' in result.stderr and result.stderr.count('\n') == 1
