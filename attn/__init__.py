"""attn: tiled online-softmax attention for PyTorch.

One algorithm (the FlashAttention-2 forward and backward) written as Cython + OpenMP
kernels for CPUs (``attn.cpu``) and Numba CUDA kernels for GPUs (``attn.gpu``), behind
one autograd layer and a backend registry.

    >>> import attn
    >>> out = attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> out, lse = attn.scaled_dot_product_attention(q, k, v, return_lse=True)
"""
from . import mods, reference
from ._block_mask import (
    BlockMask,
    and_masks,
    create_block_mask,
    create_mask,
    noop_mask,
    or_masks,
)
from ._flex import AuxOutput, AuxRequest, flex_attention
from ._varlen import document_block_mask, jagged_mask_mod, nested_sdpa, varlen_attn
from .backends import (
    Backend,
    BackendNotSupportedError,
    get_backend,
    list_backends,
    register_backend,
    unregister_backend,
    use_backend,
)
from .functional import scaled_dot_product_attention

# Registers attn as "attn" in PyTorch's flash-attention registry (not activated); with
# a PyTorch that lacks the registry this only records why (activate_flash_attention
# raises with that message).
from ._torch_flash import (
    FlashAttentionFallbackError,
    activate_flash_attention,
    flash_attention_calls,
    reset_flash_attention_calls,
)

__all__ = [
    "AuxOutput",
    "AuxRequest",
    "Backend",
    "BlockMask",
    "BackendNotSupportedError",
    "FlashAttentionFallbackError",
    "activate_flash_attention",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "distributed",
    "document_block_mask",
    "flash_attention_calls",
    "flex_attention",
    "get_backend",
    "jagged_mask_mod",
    "list_backends",
    "mods",
    "nested_sdpa",
    "noop_mask",
    "or_masks",
    "reference",
    "register_backend",
    "reset_flash_attention_calls",
    "scaled_dot_product_attention",
    "unregister_backend",
    "use_backend",
    "varlen_attn",
]

__version__ = "0.1.0"


def __getattr__(name):
    # attn.cpu / attn.gpu load on first use: the compiled kernels (and, for the GPU,
    # numba.cuda) are imported only by code that runs on them.
    # attn.distributed too: torch.distributed is imported only by code that shards.
    if name in ("cpu", "gpu", "distributed"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
