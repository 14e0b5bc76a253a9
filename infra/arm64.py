"""An emulated Debian arm64 system on this x86-64 machine: what `make device-arm-check` runs the board's install in.

The root filesystem is Debian's own (`debootstrap --foreign --arch=arm64`, then its second
stage run under emulation), cached under `runs/arm64/rootfs-<key>`: the key names the suite,
the mirror and the package list, so a changed list builds a new one, and a build that fails
half-way never becomes the cache (it is built beside it and renamed when complete).

Its programs run under qemu-user (`qemu-aarch64-static`), in one of two ways:
- `binfmt`: the kernel hands every aarch64 ELF to qemu (binfmt_misc), so a `chroot` runs
  the board's programs and whatever they start (pip's build steps, the profile's own
  process). When the handler is missing it is registered here from Debian's
  /usr/lib/binfmt.d/qemu-aarch64.conf, as systemd-binfmt does on a Debian host.
- `proot`: where binfmt_misc cannot be registered (an unprivileged sandbox), PRoot runs qemu
  on every aarch64 exec it traces, at the price of ptrace on every system call.
Either way the emulated processes share this machine's network (loopback included), and pip
in the rootfs trusts this machine's CA bundle (PIP_CERT): a network that re-signs TLS, as this
workshop's does, fails Debian's roots alone.
`TIERLINE_ARM_EMULATION=binfmt|proot` forces one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"  # Debian 12: python3.11, the version pyproject.toml pins
MIRROR = "http://deb.debian.org/debian"
# what a Raspberry Pi OS (bookworm) user would have: Python with venv, CA roots for pip, systemd for the unit;
# python3-distutils spelled out: debootstrap does not resolve python3.11-venv's virtual python3.11-distutils
PACKAGES = ("python3", "python3-venv", "python3-distutils", "ca-certificates", "systemd")
# host tool -> the Debian package that has it
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap", "unshare": "util-linux"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = BINFMT_DIR / "qemu-aarch64"
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # shipped by qemu-user-static
EMULATION_ENV = "TIERLINE_ARM_EMULATION"
PIP_CACHE = "/var/cache/pip"  # inside the rootfs: the host's runs/arm64/pip-cache is mounted here
# this machine's CA bundle, copied in for pip: where the network re-signs TLS (a proxy), Debian's roots alone fail
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
GUEST_HOST_CA = "/etc/ssl/host-ca-certificates.crt"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APT_TIMEOUT_S = 900.0  # apt-get update + install of the host tools, at most
BUILD_TIMEOUT_S = 1800.0  # one debootstrap stage, at most (the second runs emulated)
PROBE_TIMEOUT_S = 60.0


class EmulationError(RuntimeError):
    """The emulated system cannot be built or run; the message says which step and why."""


def _run(argv: list[str], timeout_s: float, what: str, log: Path | None = None) -> subprocess.CompletedProcess:
    out = open(log, "a") if log else subprocess.PIPE
    try:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"{what}: no result in {timeout_s:.0f} s") from None
    finally:
        if log:
            out.close()
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:] if log else proc.stdout[-2000:]
        raise EmulationError(f"{what}: exit status {proc.returncode}{f' (log: {log})' if log else ''}\n{tail}")
    return proc


def ensure_host_tools() -> list[str]:
    """apt-get install what is missing of qemu-user-static, debootstrap (and proot when it is needed)."""
    if os.geteuid() != 0:
        raise EmulationError("needs root: debootstrap, chroot and mounts (run it as root, or with sudo)")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if not shutil.which(tool)})
    if missing:
        _apt_install(missing)
    return missing


def _apt_install(packages: list[str]) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *packages]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=env)
        if proc.returncode != 0:
            raise EmulationError(f"{' '.join(argv)}: exit status {proc.returncode}\n{proc.stderr[-2000:]}")


def binfmt_enabled() -> bool:
    try:
        return BINFMT_ENTRY.read_text().splitlines()[0] == "enabled"
    except (OSError, IndexError):
        return False


def register_binfmt() -> bool:
    """Register Debian's qemu-aarch64 handler (mounting binfmt_misc first when needed); False where not allowed."""
    try:
        if not (BINFMT_DIR / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], check=True,
                           capture_output=True, timeout=PROBE_TIMEOUT_S)
        if not BINFMT_ENTRY.exists():
            (BINFMT_DIR / "register").write_text(BINFMT_CONF.read_text().strip())
    except (OSError, subprocess.SubprocessError):
        return False
    return binfmt_enabled()


def cache_key(*parts: str) -> str:
    """A short digest of what a cached thing was made from (12 hex digits)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


class Rootfs:
    """A Debian arm64 root filesystem under `workdir`, and how to run its programs (`argv`, `run`)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir.resolve()
        self.key = cache_key(SUITE, MIRROR, *PACKAGES)
        self.path = self.workdir / f"rootfs-{self.key}"
        self.pip_cache = self.workdir / "pip-cache"
        self.debs = self.workdir / "debs"  # debootstrap's package cache: a rebuild downloads nothing again
        self.mode = ""  # "binfmt" or "proot", chosen by `ensure`
        self.reused = False
        self.build_s = 0.0

    # -- running programs in it -----------------------------------------------------------------
    def argv(self, cmd: list[str], user: str | None = None, env: dict | None = None, root: Path | None = None,
             mounts: bool = True) -> list[str]:
        """The host command line that runs `cmd` inside the rootfs, emulated, with a clean environment.

        `mounts`: /proc and the pip cache, in a mount namespace of its own (nothing is left
        mounted on the host when it ends); debootstrap's second stage runs without them. Not
        /sys: there it is the x86 host's, and LiteRT's cpuinfo, reading it as an ARM board's,
        crashes the emulated agent (SIGSEGV); without it, cpuinfo says so on stderr and goes on.
        `user` (binfmt only): run as that user of the rootfs, as the systemd unit does.
        """
        root = root or self.path
        ca = {"PIP_CERT": GUEST_HOST_CA} if (root / GUEST_HOST_CA.lstrip("/")).is_file() else {}
        envs = [f"{k}={v}" for k, v in {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8",
                                        "PIP_CACHE_DIR": PIP_CACHE, **ca, **(env or {})}.items()]
        inner = ["/usr/bin/env", "-i", *envs, *cmd]
        if self.mode == "proot":
            binds = ["-b", "/proc", "-b", f"{self.pip_cache}:{PIP_CACHE}"] if mounts else []
            return ["proot", "-q", shutil.which("qemu-aarch64-static") or "qemu-aarch64-static", "-r", str(root),
                    *binds, "-w", "/", *inner]
        userspec = f"--userspec={self.ids(user)}" if user else ""
        script = ('r=$1; c=$2; u=$3; shift 3; '
                  + ('mount -t proc proc "$r/proc" && mount --bind "$c" "$r/var/cache/pip" && ' if mounts else '')
                  + 'exec chroot $u "$r" "$@"')
        return ["unshare", "--mount", "--fork", "--", "sh", "-c", script, "sh", str(root), str(self.pip_cache),
                userspec, *inner]

    def run(self, cmd: list[str], timeout_s: float, what: str, log: Path | None = None, **kw) -> str:
        """Run `cmd` in the rootfs; its stdout (and stderr), or EmulationError naming `what`."""
        return _run(self.argv(cmd, **kw), timeout_s, what, log).stdout or ""

    def ids(self, user: str) -> str:
        """"uid:gid" of a user of the rootfs (its /etc/passwd, not the host's)."""
        for line in (self.path / "etc" / "passwd").read_text().splitlines():
            name, _, uid, gid, *_ = line.split(":")
            if name == user:
                return f"{uid}:{gid}"
        raise EmulationError(f"{self.path}/etc/passwd: no user {user!r}")

    # -- building it --------------------------------------------------------------------------------
    def ensure(self, log: Path) -> "Rootfs":
        """Reuse the cached rootfs, or build it; pick the emulation (binfmt when it runs, else proot)."""
        self.pip_cache.mkdir(parents=True, exist_ok=True)
        self.debs.mkdir(parents=True, exist_ok=True)
        forced = os.environ.get(EMULATION_ENV, "")
        if forced not in ("", "binfmt", "proot"):
            raise EmulationError(f"{EMULATION_ENV}={forced!r}: one of binfmt, proot")
        t0 = time.monotonic()
        if self.path.is_dir():
            self.reused = True
            self._choose_mode(self.path, forced)
        else:
            partial = self.path.with_name(self.path.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                  f"--cache-dir={self.debs}", SUITE, str(partial), MIRROR], BUILD_TIMEOUT_S,
                 "debootstrap (first stage)", log)
            self._choose_mode(partial, forced)
            _run(self.argv(["/debootstrap/debootstrap", "--second-stage"], root=partial, mounts=False),
                 BUILD_TIMEOUT_S, "debootstrap --second-stage (emulated)", log)
            (partial / PIP_CACHE.lstrip("/")).mkdir(parents=True, exist_ok=True)
            shutil.copyfile("/etc/resolv.conf", partial / "etc" / "resolv.conf")  # pip resolves PyPI's name
            partial.rename(self.path)
        if HOST_CA.is_file():  # every run: the host's trust may have changed since the build
            shutil.copyfile(HOST_CA, self.path / GUEST_HOST_CA.lstrip("/"))
        self.build_s = round(time.monotonic() - t0, 1)
        return self

    def _choose_mode(self, root: Path, forced: str) -> None:
        """binfmt when an aarch64 /bin/true runs in a chroot (registering the handler if need be), else proot."""
        interpreter = Path("/usr/libexec/qemu-binfmt/aarch64-binfmt-P")  # where Debian's handler points
        target = root / interpreter.relative_to("/")  # a handler without the F flag looks for it in the chroot
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shutil.which("qemu-aarch64-static"), target)
        target.chmod(0o755)
        if forced != "proot" and (binfmt_enabled() or register_binfmt()):
            self.mode = "binfmt"
            try:
                _run(self.argv(["/bin/true"], root=root, mounts=False), PROBE_TIMEOUT_S, "probe")
                return
            except EmulationError:
                if forced == "binfmt":
                    raise
        if forced == "binfmt":
            raise EmulationError(f"{EMULATION_ENV}=binfmt, but binfmt_misc has no aarch64 handler and one "
                                 "cannot be registered here")
        if not shutil.which("proot"):
            _apt_install(["proot"])
        self.mode = "proot"
        _run(self.argv(["/bin/true"], root=root, mounts=False), PROBE_TIMEOUT_S, "probe (proot)")
