"""Checkpoint conversion and classification from the command line, on a fake reference F0 checkpoint."""
import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_image

from configs import nfnet as nfnet_configs
from nfnets import evaluate
from nfnets import pretrained
from scripts import classify
from scripts import convert_checkpoint
from tests import reference_forward


@pytest.fixture(scope='module')
def reference_file(tmp_path_factory):
  params = reference_forward.random_params(pretrained.expected_shapes('F0', num_classes=1000), seed=5)
  path = tmp_path_factory.mktemp('reference') / 'F0_haiku.npz'
  path.write_bytes(pickle.dumps(params, protocol=4))
  return str(path), params


@pytest.fixture(scope='module')
def converted(reference_file, tmp_path_factory):
  destination = str(tmp_path_factory.mktemp('converted') / 'F0')
  assert convert_checkpoint.main([reference_file[0], destination]) == 0
  return destination


def test_conversion_keeps_every_weight_and_the_variant(reference_file, converted):
  model_config, weight_sets = evaluate.load_checkpoint_weights(converted, nfnet_configs.get_config('tiny').model)
  assert (model_config.variant, model_config.num_classes, model_config.depths) == ('F0', 1000, None)
  assert set(weight_sets) == {''}
  params, _ = weight_sets['']
  expected = reference_file[1]
  assert set(params) == set(expected)
  for module, leaves in expected.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(params[module][name], value)


def test_conversion_refuses_to_overwrite_and_reports_bad_input(reference_file, converted, tmp_path, capsys):
  assert convert_checkpoint.main([reference_file[0], converted]) == 1
  assert 'already exists' in capsys.readouterr().err
  evil = tmp_path / 'evil.npz'
  evil.write_bytes(b'cos\nsystem\n(S"echo hacked"\ntR.')
  assert convert_checkpoint.main([str(evil), str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err
  assert err.startswith('error:') and 'os' in err and err.count('\n') == 1
  assert not (tmp_path / 'out').exists()


def test_classify_gives_the_same_answer_from_the_pickle_and_the_conversion(reference_file, converted,
                                                                          tmp_path, capsys):
  paths = []
  for name in ('china.jpg', 'flower.jpg'):
    buffer = io.BytesIO()
    Image.fromarray(load_sample_image(name)).save(buffer, format='JPEG')
    (tmp_path / name).write_bytes(buffer.getvalue())
    paths.append(str(tmp_path / name))
  # A small evaluation resolution keeps the full-size F0 cheap on CPU.
  assert classify.main([*paths, '--checkpoint', reference_file[0], '--config', 'tiny', '--top', '3']) == 0
  from_pickle = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert classify.main([*paths, '--checkpoint', converted, '--config', 'tiny', '--top', '3']) == 0
  from_conversion = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert from_pickle == from_conversion
  assert [r['image'] for r in from_pickle] == paths
  for result in from_pickle:
    probabilities = result['probabilities']
    assert len(result['top_classes']) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0 + 1e-6
