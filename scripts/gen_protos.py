"""Generate Python code and typed stubs for protos/ into kvcluster/proto/ (git-ignored).

The .proto files live under protos/kvcluster/proto/, so protoc itself names the modules
`kvcluster.proto.*_pb2` and writes their imports that way; the proto package stays `kvcluster.v1`
(the wire and service names).
"""

import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "kvcluster" / "proto"


def main() -> int:
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={ROOT}",
            f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", *sources]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    (OUT / "__init__.py").write_text('"""Generated protobuf code (see scripts/gen_protos.py)."""\n')
    (OUT / "py.typed").write_text("")
    print(f"generated {len(sources)} protos into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
