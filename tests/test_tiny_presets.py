"""Each family's `tiny` preset reaches the accuracy its docs state, with the documented command.

The figures come from one table (`configs/tiny_presets.py`): the docs are checked to state them, and the
slow tests rerun each command as a user would (one CPU device, XLA's default optimisation) and compare.
"""
import os
import re
import subprocess
import sys
import tempfile

import jax
import pytest

from configs import tiny_presets
from nfnets import models
from scripts import tested_stack
from tests.helpers import REPO_ROOT

FAMILIES = sorted(tiny_presets.MEASURED)
# How the zoo paragraph of docs/models.md names each family next to its figure.
ZOO_NAMES = {'nf_resnet': 'NF-ResNet', 'nf_regnet': 'NF-RegNet', 'se_resnext': 'SE-ResNeXt-D'}
TOLERANCE_POINTS = 2.0
_FINAL_LINE = re.compile(r'^final: step \d+ \| test top-1 ([\d.]+)% \(EMA ([\d.]+)%\)', re.MULTILINE)
# conftest.py's flags for the suite's own processes: a user's run has neither.
_SUITE_ONLY_XLA_FLAGS = ('--xla_force_host_platform_device_count', '--xla_backend_optimization_level')


def _read(relative_path: str) -> str:
  with open(os.path.join(REPO_ROOT, relative_path), encoding='utf-8') as f:
    return f.read()


def _percent(value: float) -> str:
  return f'{value:.1f} %'


def test_the_table_covers_every_model_family():
  # Each registered family has a config file of its name with a `tiny` preset.
  assert set(tiny_presets.MEASURED) == set(models.family_names())
  assert set(ZOO_NAMES) == set(tiny_presets.MEASURED) - {'nfnet'}


@pytest.mark.parametrize('family', FAMILIES)
def test_the_presets_page_states_the_measured_figures(family):
  measured = tiny_presets.MEASURED[family]
  rows = [line for line in _read('docs/model_zoo_presets.md').splitlines()
          if line.startswith('|') and f'`{tiny_presets.command(family)}`' in line]
  assert len(rows) == 1, f'one table row with the command for {family}'
  assert f'{_percent(measured.top1)} (EMA {_percent(measured.ema_top1)})' in rows[0]
  if measured.newest_stack:
    top1, ema_top1 = measured.newest_stack
    assert f'on jax {tested_stack.NEWEST.jax}: {_percent(top1)} (EMA {_percent(ema_top1)})' in rows[0]
  assert f'{measured.seconds} s' in rows[0]


def test_the_models_page_and_the_readme_state_the_measured_figures():
  models_page = ' '.join(_read('docs/models.md').split())  # its paragraphs wrap anywhere
  for family, name in ZOO_NAMES.items():
    measured = tiny_presets.MEASURED[family]
    assert f'{name} {_percent(measured.top1)} test top-1 in {measured.seconds} s' in models_page, family
  readme = ' '.join(_read('README.md').split())
  # The first command's output, quoted in full (`python -m experiments.train` is the NFNet preset).
  nfnet = tiny_presets.MEASURED['nfnet']
  assert f'test top-1 {nfnet.top1:.2f}% (EMA {nfnet.ema_top1:.2f}%)' in readme


def _user_environment() -> dict[str, str]:
  env = dict(os.environ)
  flags = [f for f in env.pop('XLA_FLAGS', '').split() if not f.startswith(_SUITE_ONLY_XLA_FLAGS)]
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  # A cache of its own (the suite's holds programs compiled under other flags). It changes no result.
  env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tempfile.gettempdir(), 'nfnets-tiny-presets-jax-cache')
  return env


@pytest.mark.slow
@pytest.mark.parametrize('family', FAMILIES)
def test_the_documented_command_reaches_the_documented_accuracy(family, tmp_path):
  command = tiny_presets.command(family).split()
  assert command[:3] == ['python', '-m', 'experiments.train']
  result = subprocess.run([sys.executable, *command[1:], f'--workdir={tmp_path / "run"}'], cwd=REPO_ROOT,
                          env=_user_environment(), capture_output=True, text=True, timeout=2400)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  final = _FINAL_LINE.findall(result.stdout)
  assert len(final) == 1, result.stdout[-2000:]
  print(f'{family}:', _FINAL_LINE.search(result.stdout).group(0))  # shown by `pytest -rA`
  top1, ema_top1 = (float(v) for v in final[0])
  measured = tiny_presets.MEASURED[family]
  expected = (measured.top1, measured.ema_top1)
  if measured.newest_stack and jax.__version__ == tested_stack.NEWEST.jax:
    expected = measured.newest_stack
  assert abs(top1 - expected[0]) <= TOLERANCE_POINTS, (family, top1, expected)
  assert abs(ema_top1 - expected[1]) <= TOLERANCE_POINTS, (family, ema_top1, expected)
