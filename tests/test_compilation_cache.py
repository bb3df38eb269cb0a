"""Where the persistent compilation cache lives, and how to turn it off."""
import jax

from ddq_jax import compilation_cache as cc


def test_cache_dir_from_env(monkeypatch, tmp_path):
  monkeypatch.delenv(cc.ENV, raising=False)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert cc.cache_dir_from_env() == str(tmp_path / 'ddq_jax' / 'jax')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path))
  assert cc.default_cache_dir() == str(tmp_path / '.cache' / 'ddq_jax' / 'jax')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'j'))
  assert cc.cache_dir_from_env() == str(tmp_path / 'j')
  monkeypatch.setenv(cc.ENV, str(tmp_path / 'mine'))
  assert cc.cache_dir_from_env() == str(tmp_path / 'mine')
  for off in ('off', '0', 'false', 'NO'):
    monkeypatch.setenv(cc.ENV, off)
    assert cc.cache_dir_from_env() is None


def test_enable_sets_jax_config(monkeypatch, tmp_path):
  before = (jax.config.jax_enable_compilation_cache,
            jax.config.jax_compilation_cache_dir)
  try:
    monkeypatch.setenv(cc.ENV, str(tmp_path / 'c'))
    assert cc.enable_compilation_cache() == str(tmp_path / 'c')
    assert (tmp_path / 'c').is_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'c')
    assert jax.config.jax_enable_compilation_cache
    assert cc.enable_compilation_cache(False) is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update('jax_enable_compilation_cache', before[0])
    jax.config.update('jax_compilation_cache_dir', before[1])
