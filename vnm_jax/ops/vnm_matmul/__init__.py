"""The V:N:M sparse matmul op: its weight layout, the XLA reference, the Pallas kernels.

One folder per op, in the tokamax manner:

- ``layout``: the one home of the weight layout (pack, unpack, condense, scatter);
- ``xla``: the XLA implementation (the reference and the fallback), raw arrays;
- ``pallas_decode`` / ``pallas_prefill``: the Pallas GPU kernels, raw arrays;
- ``prepared``: :class:`PreparedVNMWeight` and :func:`prepare` (the execution layout,
  built once);
- ``dispatch``: which formulation runs a given token count (measured tables);
- ``api``: :func:`vnm_matmul` with ``implementation=None | "pallas" | "xla"``.

The public names below load on first use, so that ``vnm_jax.format`` (which this
package's ``api`` imports) can itself import ``layout``.
"""

_EXPORTS = {
    "vnm_matmul": "api",
    "PreparedVNMWeight": "prepared",
    "prepare": "prepared",
    "resolve_implementation": "prepared",
    "IMPLEMENTATIONS": "prepared",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    # Deferred: vnm_jax.format imports ``layout`` from this package, and ``api`` imports format.
    from vnm_jax.ops.vnm_matmul import api, prepared
    return getattr({"api": api, "prepared": prepared}[_EXPORTS[name]], name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
