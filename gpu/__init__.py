"""Numba CUDA kernels (the next issue). Importing this package never imports numba.cuda."""
