"""The README's front door agrees with the code: the variant table with the published figures the tests
check the models against, and every page under docs/ is linked (and every link resolves)."""
import os
import re

from configs import nfnet as nfnet_configs
from tests.helpers import REPO_ROOT


def _read(path):
  with open(os.path.join(REPO_ROOT, path), encoding='utf-8') as f:
    return f.read()


def test_readme_variant_table_equals_the_published_figures():
  rows = re.findall(r'^\| (F\d) \| [\d,]+ \| \d+ / \d+ \| ([\d.]+)M \| ([\d.]+)B[^|]* \| ([^|]*) \|$',
                    _read('README.md'), flags=re.M)
  assert [variant for variant, *_ in rows] == [f'F{i}' for i in range(8)]
  for variant, params, macs, accuracy in rows:
    published = nfnet_configs.PUBLISHED[variant]
    assert float(params) == published['params_millions'], variant
    if published['macs_billions'] is not None:
      assert float(macs) == published['macs_billions'], variant
    if published['top1'] is None:
      assert accuracy.strip() == '–', variant
    else:
      assert accuracy.startswith(f"{published['top1']} / {published['top5']}"), variant


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
  readme = _read('README.md')
  links = set(re.findall(r'\]\((docs/[^)#]+)', readme))
  pages = {f'docs/{name}' for name in os.listdir(os.path.join(REPO_ROOT, 'docs')) if name.endswith('.md')}
  assert pages <= links, sorted(pages - links)
  for page in sorted(pages):
    for target in re.findall(r'\]\(([^)#:]+\.md)', _read(page)):
      assert os.path.exists(os.path.join(REPO_ROOT, 'docs', target)), (page, target)
  assert all(os.path.exists(os.path.join(REPO_ROOT, link)) for link in links), links


def test_ci_runs_exactly_the_readmes_test_commands():
  readme = _read('README.md')
  commands = re.findall(r'^    (python -m pytest[^\n]*)$', readme, re.MULTILINE)
  assert commands == ['python -m pytest -q', 'python -m pytest -q -m slow']
  ci_commands = [line.strip() for line in _read('.ci/run').splitlines()
                 if 'pytest' in line and not line.lstrip().startswith('#')]
  assert ci_commands == commands
