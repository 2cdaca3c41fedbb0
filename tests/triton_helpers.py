"""What the Triton test files share: where their kernels run."""

import os

import pytest

# tests/conftest.py sets TRITON_INTERPRET=1 before collection where there is no CUDA device
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_device() -> str:
    """ "cpu" under the Triton interpreter, else "cuda"; skips the calling test module (at import)
    where neither can run."""
    import torch

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is not 1 and there is no CUDA device", allow_module_level=True)
    return "cpu" if INTERPRET else "cuda"
