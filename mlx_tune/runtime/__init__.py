"""Runtime: what the process runs on, decided once.

Owns the OpenBLAS preload (``blas``), the backend / kernel-path decision and the CPU
streams. Imports nothing from the rest of mlx_tune (every other stage may import it).
"""
