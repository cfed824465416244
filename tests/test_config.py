import pytest

from vnm_jax import VNMConfig


def test_parse_and_str_round_trip():
  config = VNMConfig.parse("64:2:8")
  assert (config.v, config.n, config.m) == (64, 2, 8)
  assert str(config) == "64:2:8"
  assert VNMConfig.parse(str(config)) == config
  assert VNMConfig.parse(config) is config


def test_density_and_2to4():
  assert VNMConfig(64, 2, 5).density == pytest.approx(0.4)
  assert VNMConfig(128, 2, 8).density == pytest.approx(0.25)
  two_four = VNMConfig.parse("2:4")
  assert two_four.is_2to4 and two_four.m == 4 and two_four.density == 0.5
  assert not VNMConfig(64, 2, 5).is_2to4
  assert VNMConfig(64, 2, 8).column_subsets == 70


def test_hashable_for_jit_static_args():
  assert hash(VNMConfig(64, 2, 8)) == hash(VNMConfig.parse("64:2:8"))


@pytest.mark.parametrize("text, message", [
    ("64:3:8", "n must be 2"),
    ("64:2:3", "m must be >= 4"),
    ("0:2:8", "v must be >= 1"),
    ("64-2-8", "V:N:M"),
    ("64:2", "n must be 2"),  # read as N:M = 64:2
    ("a:2:8", "V:N:M"),
])
def test_bad_configs_name_the_problem(text, message):
  with pytest.raises(ValueError, match=message):
    VNMConfig.parse(text)


def test_bad_types():
  with pytest.raises(TypeError, match="VNMConfig.v must be an int"):
    VNMConfig(64.0, 2, 8)
  with pytest.raises(TypeError, match="config must be"):
    VNMConfig.parse(8)
