"""The format, at the bottom: MXFP4 numerics, the reference that defines the bytes, the fast kernels."""
