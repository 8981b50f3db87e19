"""Generate Python code and typed stubs for protos/ into kvcluster/proto/ (git-ignored).

protoc names modules after the proto package (`kvcluster.v1.*_pb2`), which would shadow our own
`kvcluster` package, so the generated files are flattened into `kvcluster/proto/` and their
imports rewritten to `kvcluster.proto`.
"""

import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "kvcluster" / "proto"
IMPORT_RE = re.compile(r"^from kvcluster\.v1 import", re.MULTILINE)


def main() -> int:
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *sources]
        if protoc.main(args) != 0:
            print("protoc failed", file=sys.stderr)
            return 1
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        for generated in (Path(tmp) / "kvcluster" / "proto").iterdir():
            text = IMPORT_RE.sub("from kvcluster.proto import", generated.read_text())
            (OUT / generated.name).write_text(text)
    (OUT / "__init__.py").write_text('"""Generated protobuf code (see scripts/gen_protos.py)."""\n')
    (OUT / "py.typed").write_text("")
    print(f"generated {len(sources)} protos into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
