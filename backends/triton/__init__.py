"""reflora.backends.triton: fused NF4 and QLoRA Triton kernels."""
