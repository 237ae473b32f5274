"""The model registry's contract with every family: the default `config.model` is the constructor's defaults."""
import inspect

import pytest

from nfnets import models


@pytest.mark.parametrize('name', models.family_names())
def test_default_model_config_is_the_constructors_defaults(name):
  """Each family's defaults are written once, in its module's constructor: a config that added, dropped or
  changed an argument's default would fail here."""
  family = models.get_family(name)
  parameters = {p.name: p for p in list(inspect.signature(family.module.__init__).parameters.values())[1:]
                if p.name != 'name'}  # the Haiku module name; the config's `name` is the family's
  for variant in family.variants:
    config = models.model_config(name, variant)
    assert config.name == name and config.variant == variant
    assert set(config) - {'name'} == set(parameters), variant
    for key, parameter in parameters.items():
      if key != 'variant':
        value = config[key]
        assert (tuple(value) if isinstance(value, list) else value) == parameter.default, (variant, key)
    # The module accepts exactly what the config holds (None entries are left to the variant's table).
    inspect.signature(family.module).bind(**models.model_kwargs(config))
