"""The partitioner inductor uses under activation hooks (compile_support
`_eager_saves` says why). Its own module: it imports inductor, which only a
model compiling with activation hooks needs, and inductor pickles its config
(this object included) into cache keys, which needs a module-level class."""
from __future__ import annotations

from torch._inductor.custom_graph_pass import CustomPartitionerFn


class EagerSaves(CustomPartitionerFn):
    """AOT's default partitioner: the backward reads what the forward computed."""

    def __call__(self, gm, joint_inputs, **kwargs):
        from torch._functorch.partitioners import default_partition

        kwargs.pop("compiler", None)  # min-cut's argument; the default partitioner takes none
        return default_partition(gm, joint_inputs, **kwargs)

    def uuid(self):
        return "fxcompress.default_partition.v1"


PARTITIONER = EagerSaves()
