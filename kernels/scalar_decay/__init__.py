"""Chunked linear attention with a scalar decay per token and head, in Triton: the engine
behind stripes.kernels.retention (a constant decay per head) and stripes.kernels.ssd
(Mamba-2: q = C, k = B, v = dt x, log decay dt A, grouped B/C). kernel.py holds the kernels
and their equations; function.py the launchers, the autograd Function and
`chunk_scalar_decay`, the entry point those public functions call on CUDA. Its references
are theirs (stripes.arch.retention_forms, stripes.arch.ssd)."""
