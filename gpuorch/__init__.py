"""gpuorch: a GPU cluster orchestrator. This package is what users, tools and both daemons share.

    import gpuorch
    with gpuorch.Client() as client:           # $GPUORCH_COORDINATOR or 127.0.0.1:50051
        for node in client.list_nodes():
            print(node.node_id, len(node.devices))

Inside a rank, `from gpuorch import worker` imports neither gRPC nor the SDK.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "GpuorchError", "__version__", "default_address"]


def __getattr__(name: str):
    # Lazy, so that worker processes importing gpuorch.worker do not pay for gRPC.
    if name in ("Client", "AsyncClient", "default_address"):
        from gpuorch import client

        return getattr(client, name)
    if name == "GpuorchError":
        from gpuorch.errors import GpuorchError

        return GpuorchError
    raise AttributeError(f"module 'gpuorch' has no attribute {name!r}")
