"""gpuorch: a GPU cluster orchestrator. This package is what users, tools and both daemons share.

    import gpuorch
    with gpuorch.Client() as client:           # $GPUORCH_COORDINATOR or 127.0.0.1:50051
        for node in client.list_nodes():
            print(node.node_id, len(node.devices))
"""

__version__ = "0.1.0"

from gpuorch.client import AsyncClient, Client, default_address  # noqa: E402
from gpuorch.errors import GpuorchError  # noqa: E402

__all__ = ["AsyncClient", "Client", "GpuorchError", "__version__", "default_address"]
