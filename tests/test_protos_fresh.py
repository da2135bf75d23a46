"""The committed generated code must match the .proto files."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    gen_protos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_protos)
    gen_protos.generate(tmp_path)
    fresh_dir = tmp_path / "gpuorch" / "v1"
    committed_dir = REPO / "gpuorch" / "v1"
    generated = sorted(path.name for path in fresh_dir.iterdir())
    assert generated, "the generator wrote nothing"
    stale = [name for name in generated if not filecmp.cmp(fresh_dir / name, committed_dir / name, shallow=False)]
    assert not stale, f"gpuorch/v1 is stale for {stale}: run `python scripts/gen_protos.py` and commit"


def test_every_message_field_and_enum_value_has_a_comment():
    """Operators read these through `grpcurl describe`."""
    from google.protobuf import descriptor_pb2

    data = (REPO / "gpuorch" / "v1" / "descriptors.binpb").read_bytes()
    descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    missing = []
    for file in descriptor_set.file:
        if not file.name.startswith("gpuorch/"):
            continue
        commented = {tuple(location.path) for location in file.source_code_info.location if location.leading_comments.strip()}

        def check(path, name, commented=commented, file=file):
            if tuple(path) not in commented:
                missing.append(f"{file.name}: {name}")

        for m_index, message in enumerate(file.message_type):
            check([4, m_index], message.name)
            for f_index, field in enumerate(message.field):
                check([4, m_index, 2, f_index], f"{message.name}.{field.name}")
            for o_index, oneof in enumerate(message.oneof_decl):
                check([4, m_index, 8, o_index], f"{message.name}.{oneof.name}")
        for e_index, enum in enumerate(file.enum_type):
            check([5, e_index], enum.name)
            for v_index, value in enumerate(enum.value):
                check([5, e_index, 2, v_index], f"{enum.name}.{value.name}")
        for s_index, service in enumerate(file.service):
            for r_index, method in enumerate(service.method):
                check([6, s_index, 2, r_index], f"{service.name}.{method.name}")
    assert not missing, f"uncommented: {missing}"
