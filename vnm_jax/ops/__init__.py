"""Ops: one package per op (its layout, reference, kernels and dispatch side by side)."""
