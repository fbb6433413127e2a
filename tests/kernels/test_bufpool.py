"""The decode-buffer pool: a block comes back only when no tensor uses it."""
import gc

import torch

from fxcompress.kernels.bufpool import BufferPool


def test_block_is_reused_only_after_every_view_dies():
    pool = BufferPool(max_free=1 << 24)
    a = pool.empty((256, 64), torch.float32)
    a.fill_(1.5)
    v = a[3:].reshape(-1)  # a view keeps the block out of the pool
    addr = a.data_ptr()
    del a
    gc.collect()
    b = pool.empty((256, 64), torch.float32)
    assert b.data_ptr() != addr and pool.hits == 0
    assert torch.all(v == 1.5)
    del v
    gc.collect()
    c = pool.empty((256, 64), torch.float32)
    assert c.data_ptr() == addr and pool.hits == 1
    assert b.dtype == c.dtype == torch.float32 and c.shape == (256, 64)


def test_dtypes_shapes_and_the_cap():
    pool = BufferPool(max_free=8192)
    t = pool.empty((3, 5), torch.int64)
    assert t.dtype == torch.int64 and t.shape == (3, 5) and t.is_contiguous()
    t.copy_(torch.arange(15).view(3, 5))
    assert int(t.sum()) == 105
    big = pool.empty((1 << 16,), torch.float32)  # 256 KB: over the cap, released on death
    del big, t
    gc.collect()
    assert pool.free_bytes <= 8192
    z = pool.empty((0, 4), torch.float32)
    assert z.numel() == 0
