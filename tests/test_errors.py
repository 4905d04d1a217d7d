"""Bad inputs raise clear errors that name the offending argument."""

import pytest
import torch

import attn

ERR = (ValueError, TypeError, RuntimeError)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def sdpa(*a, **kw):
    return attn.scaled_dot_product_attention(*a, **kw)


Q = lambda: _t(2, 4, 5, 8)  # noqa: E731
K = lambda: _t(2, 4, 7, 8)  # noqa: E731
V = lambda: _t(2, 4, 7, 6)  # noqa: E731


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        # wrong ndim
        ((_t(4, 5, 8), K(), V()), {}, "query"),
        ((Q(), _t(2, 4, 7, 8, 1), V()), {}, "key"),
        ((Q(), K(), _t(4, 7, 6)), {}, "value"),
        # batch mismatch
        ((Q(), _t(3, 4, 7, 8), _t(3, 4, 7, 6)), {}, "key|batch"),
        ((Q(), K(), _t(3, 4, 7, 6)), {}, "value|batch"),
        # head dim of query and key
        ((Q(), _t(2, 4, 7, 9), V()), {}, "key"),
        # key / value length
        ((Q(), K(), _t(2, 4, 6, 6)), {}, "value"),
        # key / value heads
        ((Q(), K(), _t(2, 2, 7, 6)), {"enable_gqa": True}, "value"),
        # dtype mismatch
        ((Q(), K().double(), V()), {}, "key|dtype"),
        ((Q(), K(), V().half()), {}, "value|dtype"),
        # heads: not divisible with GQA, different without it
        ((Q(), _t(2, 3, 7, 8), _t(2, 3, 7, 6)), {"enable_gqa": True}, "enable_gqa|head"),
        ((Q(), _t(2, 2, 7, 8), _t(2, 2, 7, 6)), {}, "enable_gqa"),
        # attn_mask shape
        ((Q(), K(), V()), {"attn_mask": torch.ones(5, 6, dtype=torch.bool)}, "attn_mask"),
        ((Q(), K(), V()), {"attn_mask": torch.ones(3, 4, 5, 7, dtype=torch.bool)}, "attn_mask"),
        ((Q(), K(), V()), {"attn_mask": torch.ones(1, 2, 4, 5, 7, dtype=torch.bool)}, "attn_mask"),
        ((Q(), K(), V()), {"attn_mask": torch.zeros(2, 4, 7, 5)}, "attn_mask"),
        # attn_mask dtype
        ((Q(), K(), V()), {"attn_mask": torch.ones(5, 7, dtype=torch.int64)}, "attn_mask"),
        ((Q(), K(), V()), {"attn_mask": torch.ones(5, 7, dtype=torch.uint8)}, "attn_mask"),
        # scale
        ((Q(), K(), V()), {"scale": "0.5"}, "scale"),
    ],
    ids=[
        "query-3d", "key-5d", "value-3d", "batch-key", "batch-value", "headdim-key",
        "kv-length", "kv-heads", "dtype-key", "dtype-value", "gqa-not-divisible",
        "heads-without-gqa", "mask-bad-lk", "mask-bad-batch", "mask-5d", "mask-transposed",
        "mask-int64", "mask-uint8", "scale-string",
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ERR, match=match):
        sdpa(*args, **kwargs)


def test_integer_tensors_type_error():
    with pytest.raises(TypeError, match="query"):
        sdpa(Q().to(torch.int64), K().to(torch.int64), V().to(torch.int64))
    with pytest.raises(TypeError, match="query"):
        sdpa(Q().to(torch.int32), K().to(torch.int32), V().to(torch.int32))


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_single_integer_tensor_named(which):
    # one integer tensor among float ones: TypeError (integer) or ValueError (dtype
    # mismatch) are both fair, as long as the message names it
    t = {"query": Q(), "key": K(), "value": V()}
    t[which] = t[which].to(torch.int64)
    with pytest.raises((TypeError, ValueError), match=which):
        sdpa(t["query"], t["key"], t["value"])


def test_device_mismatch():
    k = torch.empty(2, 4, 7, 8, device="meta")
    with pytest.raises(ERR, match="key|device"):
        sdpa(Q(), k, V())


def test_mask_and_causal_value_error():
    with pytest.raises(ValueError, match="attn_mask|is_causal"):
        sdpa(Q(), K(), V(), attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_dropout_not_implemented(p):
    with pytest.raises(NotImplementedError):
        sdpa(Q(), K(), V(), dropout_p=p)


def test_dropout_zero_is_fine():
    out = sdpa(Q(), K(), V(), dropout_p=0.0)
    assert out.shape == (2, 4, 5, 6)


def test_valid_broadcast_masks_accepted():
    for shape in [(5, 7), (1, 1, 5, 7), (2, 1, 1, 7), (2, 4, 5, 7), (7,), (1, 5, 7), (4, 1, 7)]:
        out = sdpa(Q(), K(), V(), attn_mask=torch.ones(shape, dtype=torch.bool))
        assert out.shape == (2, 4, 5, 6), shape
