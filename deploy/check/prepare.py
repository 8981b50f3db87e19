"""What `make deploy-check` needs on a Debian machine without a container registry, each step
skipped when already done: Debian's docker.io, docker-compose and debootstrap; a running dockerd
(vfs storage); a Debian bookworm base image made with debootstrap; the torch CPU wheel staged in
deploy/wheels; the Redis and Prometheus stand-in images; the secret files; the kvcluster image.
"""

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
WHEELS = DEPLOY / "wheels"
WORK = Path(os.environ.get("KVC_DEPLOY_CHECK_DIR", "/var/tmp/kvc-deploy"))
BASE_IMAGE = "kvc-base/debian:bookworm"
STANDINS = {"redis": "kvc-standin/redis:bookworm", "prometheus": "kvc-standin/prometheus:bookworm"}
IMAGE = "kvcluster:cpu"
APT_TOOLS = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}
TORCH_VERSION = "2.13.0"
HOST_CA_DIR = "/usr/local/share/ca-certificates"
# The 20.10 client Debian ships has BuildKit built in (the docker CLI 28 on PATH would need buildx),
# and BuildKit reads deploy/Dockerfile.dockerignore, so .venv and the secrets stay out of the context.
DOCKER_BUILD = ["nice", "-n", "10", "/usr/bin/docker", "build", "--network", "host"]
BUILD_ENV = {**os.environ, "DOCKER_BUILDKIT": "1"}


def log(message: str) -> None:
    print(f"[deploy-check] {message}", flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=True, **kwargs)


def succeeds(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


def ensure_apt_tools() -> None:
    missing = [package for tool, package in APT_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        log(f"installing {' '.join(missing)} (apt)")
        run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
        run(["apt-get", "install", "-y", "-q", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL)


def ensure_dockerd() -> None:
    if succeeds(["docker", "info"]):
        return
    WORK.mkdir(parents=True, exist_ok=True)
    log(f"starting dockerd --storage-driver=vfs (log: {WORK / 'dockerd.log'})")
    with open(WORK / "dockerd.log", "ab") as dockerd_log:
        subprocess.Popen(["dockerd", "--storage-driver=vfs"], stdout=dockerd_log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    for _ in range(60):
        if succeeds(["docker", "info"]):
            return
        time.sleep(1)
    raise SystemExit(f"dockerd did not come up; see {WORK / 'dockerd.log'}")


def ensure_base_image() -> None:
    """Debian bookworm (minbase, Python 3.11) from Debian's mirror, imported as a docker image."""
    if succeeds(["docker", "image", "inspect", BASE_IMAGE]):
        return
    rootfs = WORK / "rootfs"
    if not (rootfs / "usr/bin/python3").exists():
        log(f"debootstrap bookworm into {rootfs} (a few minutes)")
        shutil.rmtree(rootfs, ignore_errors=True)
        run(["nice", "-n", "10", "debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(rootfs), "http://deb.debian.org/debian"], stdout=subprocess.DEVNULL)
        for leftovers in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
            for path in glob.glob(str(rootfs / leftovers)):
                Path(path).unlink() if Path(path).is_file() else shutil.rmtree(path)
    trust_host_certificates(rootfs)
    log(f"docker import {rootfs} as {BASE_IMAGE}")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, stdout=subprocess.DEVNULL)
    if tar.wait() != 0:
        raise SystemExit("tar of the debootstrap root failed")


def trust_host_certificates(rootfs: Path) -> None:
    """The machine's own CA certificates (an egress proxy's, under /usr/local/share/ca-certificates) go
    into the local base, and pip there uses the system bundle, so builds on it reach the registries
    the host reaches. Only this local base carries them, never the Dockerfile."""
    extra = sorted(Path(HOST_CA_DIR).glob("*.crt"))
    if extra:
        (rootfs / HOST_CA_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for certificate in extra:
            shutil.copy(certificate, rootfs / HOST_CA_DIR.lstrip("/") / certificate.name)
        run(["chroot", str(rootfs), "update-ca-certificates"], stdout=subprocess.DEVNULL)
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


def staged_torch_wheel() -> str:
    """The torch CPU wheel pip finds on this machine, copied into deploy/wheels (git-ignored): the
    image installs it instead of downloading PyPI's multi-GB CUDA build."""
    pattern = f"torch-{TORCH_VERSION}+cpu-*.whl"
    staged = sorted(WHEELS.glob(pattern))
    if not staged:
        log("staging the torch CPU wheel into deploy/wheels")
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             f"torch=={TORCH_VERSION}", "-d", str(WHEELS)])
        staged = sorted(WHEELS.glob(pattern))
    if not staged:
        found = [p.name for p in WHEELS.glob("torch-*.whl")]
        raise SystemExit(f"pip found no torch {TORCH_VERSION}+cpu wheel (got {found}); refusing to build with CUDA torch")
    return staged[-1].name


def ensure_standins() -> None:
    for target, tag in STANDINS.items():
        if succeeds(["docker", "image", "inspect", tag]):
            continue
        log(f"building the stand-in {tag} from Debian's packages")
        run([*DOCKER_BUILD, "-q", "-f", str(DEPLOY / "check" / "standins.Dockerfile"), "--target", target,
             "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, str(DEPLOY / "check")],
            env=BUILD_ENV, stdout=subprocess.DEVNULL)


def ensure_secrets() -> None:
    run(["sh", str(DEPLOY / "make-secrets.sh"), str(DEPLOY / "secrets")], stdout=subprocess.DEVNULL)


def build_image(log_file: Path) -> float:
    """Builds the kvcluster image (layers reused when nothing changed); returns the seconds it took."""
    wheel = staged_torch_wheel()
    log(f"docker build {IMAGE} on {BASE_IMAGE} with {wheel} (log: {log_file})")
    started = time.monotonic()
    with open(log_file, "wb") as build_log:
        done = subprocess.run([*DOCKER_BUILD, "--progress=plain", "-f", str(DEPLOY / "Dockerfile"), "-t", IMAGE,
                               "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_WHEEL={wheel}",
                               str(REPO_ROOT)], env=BUILD_ENV, stdout=build_log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"docker build failed; see {log_file}")
    return time.monotonic() - started


def image_size_bytes(tag: str) -> int:
    return int(subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", tag], check=True,
                              capture_output=True, text=True).stdout)


def prepare() -> None:
    ensure_apt_tools()
    ensure_dockerd()
    ensure_base_image()
    ensure_standins()
    ensure_secrets()
