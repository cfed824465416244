"""The V:N:M sparse matmul op: its weight layout, the XLA reference and the Pallas kernels."""
