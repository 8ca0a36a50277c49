"""Backends implement the three functional ops of SPEC section 3 on already-validated inputs.

``torch_ref`` is the definition (readable, CPU and CUDA). Faster backends must agree with it
bit for bit; tests run every registered backend over the same generated cases.
"""
