"""Server reflection that keeps the .proto comments, so `grpcurl describe` shows them.

Generated Python code drops the comments (SourceCodeInfo) from its descriptors.
scripts/gen_protos.py also writes gpuorch/v1/descriptors.binpb with them; this
pool answers reflection from the normal descriptors and adds the comments back.
"""

from __future__ import annotations

from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection

from coordinator.api.auth import StreamQuota


def _source_infos() -> dict[str, descriptor_pb2.SourceCodeInfo]:
    data = resources.files("gpuorch.v1").joinpath("descriptors.binpb").read_bytes()
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    return {file.name: file.source_code_info for file in descriptor_set.file if file.name.startswith("gpuorch/")}


class _CommentedFile:
    """A FileDescriptor whose CopyToProto includes the source comments."""

    def __init__(self, descriptor, infos: dict[str, descriptor_pb2.SourceCodeInfo]) -> None:
        self._descriptor = descriptor
        self._infos = infos
        self.name = descriptor.name

    @property
    def dependencies(self):
        return [_CommentedFile(dependency, self._infos) for dependency in self._descriptor.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._descriptor.CopyToProto(proto)
        info = self._infos.get(self.name)
        if info is not None:
            proto.source_code_info.CopyFrom(info)


class CommentedPool:
    """Duck-typed DescriptorPool for grpc_reflection's servicer."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()
        self._infos = _source_infos()

    def FindFileByName(self, name):
        return _CommentedFile(self._pool.FindFileByName(name), self._infos)

    def FindFileContainingSymbol(self, symbol):
        return _CommentedFile(self._pool.FindFileContainingSymbol(symbol), self._infos)

    def __getattr__(self, name):
        return getattr(self._pool, name)


class CountedReflection(reflection.aio.ReflectionServicer):
    """Server reflection whose streams (open as long as the client likes, and tokenless) count like Health's watches."""

    def __init__(self, service_names, pool, streams: StreamQuota, client_key) -> None:
        super().__init__(service_names, pool=pool)
        self.streams = streams
        self.client_key = client_key

    async def ServerReflectionInfo(self, request_iterator, context):
        async with self.streams.slot(context, self.client_key(context)):
            async for response in super().ServerReflectionInfo(request_iterator, context):
                yield response
