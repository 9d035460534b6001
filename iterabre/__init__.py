"""iterabre: Iterative Recovery-Aided Block Reduction for Hugging Face decoder LMs.

The library is pure algorithm code (no Prefect, no MLflow): load a model, score its
decoder blocks, remove some, recover with distillation or reconstruction, evaluate.
"""

import os

__version__ = "0.1.0"

# transformers 5 turns on Hub kernels (the `kernels` package) for every from_pretrained model. On CUDA,
# switching such a model to train mode resolves kernels on the Hub: offline it raises (measured on an
# H200, docs/BENCHMARKS.md §2), online it downloads third-party code at run time. iterabre runs offline
# and the same way every time, so they stay off unless the user sets USE_HUB_KERNELS.
os.environ.setdefault("USE_HUB_KERNELS", "0")

# Training an 8B model's full weights on one GPU, PyTorch's default CUDA allocator held 8.7 GiB reserved but
# unused at the optimizer step and ran out of memory with 129.5 GiB allocated on a 139.8 GiB GPU (H200).
# Expandable segments grow blocks in place instead of leaving such gaps. Read at the first CUDA allocation,
# so it is set here, before any; a user's own allocator settings win.
if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
