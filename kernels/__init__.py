"""Triton kernels beside their torch references. Tensors in, tensors out: no specs, graphs or models here."""
