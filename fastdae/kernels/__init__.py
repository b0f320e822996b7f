"""Ops on tensors. Each module: Triton kernels -> launchers -> autograd.Function -> *_ref -> public op.

vq.py         vq_nearest, vector_quantize       (+ csrc/vq.cpp)
attention.py  attention                         (Triton flash forward/backward)
lpips.py      lpips_head                        (+ csrc/lpips.cpp)
"""
