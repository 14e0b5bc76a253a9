"""`make device-arm-check`: the device agent installed, run and compared on an emulated aarch64 board.

In a Debian arm64 root filesystem (infra/arm64.py: debootstrap, qemu-user), the steps of
infra/DEVICE_INSTALL.md as a user runs them: the repository in /opt/tierline, a venv,
`pip install '.[device]'` (no torch, no onnxruntime: checked), the manifest from
infra/manifests/device.yaml with the fields a user edits, the board's NATS identity from
`tierline devices provision`. Then, on this machine's loopback:
- a nats-server with JetStream and a reference device agent on x86-64 (infra.supervisor.Stack),
  the same model files, the same manifest policy;
- the emulated agent (`python -m tierline_device_agent`, as the tierline user), its ready
  line and gRPC health; it must register in the fleet as arch aarch64;
- the bench's prompts through both agents' gRPC front doors, greedy: every answer must be
  the same tokens (the text, its token ids under the model's tokenizer, the count and the
  finish reason);
- `tierline devices bench --profile pi` in the rootfs and on x86-64: figures under emulation,
  which say nothing about a real board's speed;
- `systemd-analyze verify` of infra/systemd/tierline-device.service, installed as the doc says.
Prints a report and writes it to runs/device-arm-check.json; exit 1 when any step fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierline_api.v1 import inference_pb2 as pb
from tierline_api.v1 import inference_pb2_grpc as pb_grpc
from tierline_device_agent.profile import MAX_TOKENS, PROMPT_SEED
from tierline_infra.arm64 import EmulationError, Rootfs, cache_key, ensure_host_tools
from tierline_infra.supervisor import Stack, accepted, launch
from tierline_shared.models.artifacts import load_index, load_tokenizer
from tierline_shared.security.credentials import SIGNING_PUB
from tierline_shared.security.identities import device_identity
from tierline_shared.tasks.problems import generate

ROOT = Path(__file__).resolve().parent.parent
BOARD = "pi-arm64"  # the emulated board's device id
OPT = "/opt/tierline"  # where the doc puts the repository, inside the rootfs
GUEST_MANIFEST = "/etc/tierline/device.yaml"
GUEST_CREDS = "/etc/tierline/creds"
GUEST_STATE = "/var/lib/tierline"
GUEST_PIP_REPORT = "/var/cache/pip/install-report.json"  # pip's record of what it resolved (--report)
PROMPTS = 16  # the bench's test-split prompts (device_agent/profile.py's seed), asked of both agents
# the packages a board must not get (the extras of other tiers); their absence is checked after the install
FORBIDDEN = ("torch", "onnxruntime")
# the board answers every prompt itself (as in tests/test_device_fleet.py): the check compares its model
POLICY = {"router.device_complexity": 1.0, "router.confidence_threshold": {"device": 0.0}}
HEARTBEAT_S = 2.0  # the emulated board's heartbeat: the fleet sees its answers soon (device.yaml says 30)
INSTALL_TIMEOUT_S = 1800.0  # the venv and pip install, emulated
READY_TIMEOUT_S = 600.0  # the emulated agent loading its model
RPC_TIMEOUT_S = 300.0  # one emulated answer, at most
PROFILE_TIMEOUT_S = 1200.0  # `tierline devices bench` under emulation
CLI_TIMEOUT_S = 60.0  # one `tierline devices ...` on x86-64
FLEET_WAIT_S = 60.0  # the board's registration, and a heartbeat counting the answers
# the doc's install steps, as a user runs them on the board (root, so no sudo); pip's --report only records
INSTALL_SCRIPT = f"""set -e
id tierline >/dev/null 2>&1 || useradd --system --home {GUEST_STATE} --shell /usr/sbin/nologin tierline
mkdir -p {OPT} /etc/tierline {GUEST_STATE} && chown tierline: {GUEST_STATE}
cd {OPT}
python3.11 -m venv .venv
.venv/bin/pip install --report {GUEST_PIP_REPORT} '.[device]'
cp infra/systemd/tierline-device.service /etc/systemd/system/
"""
INSTALL_COMMAND = "python3.11 -m venv .venv && .venv/bin/pip install '.[device]'"


# -- pure logic (tests/test_device_arm_check.py) -------------------------------------------------------
def compare_answers(reference: list[dict], emulated: list[dict], encode) -> list[dict]:
    """The prompts whose emulated answer is not the reference's token for token; [] when all are.

    An answer is a dict with text, finish_reason and completion_tokens; `encode(text)` gives the
    model tokenizer's ids. A mismatch names the prompt, the first differing token and both answers.
    """
    if len(reference) != len(emulated):
        raise ValueError(f"{len(reference)} reference answers, {len(emulated)} emulated ones")
    bad = []
    for i, (ref, arm) in enumerate(zip(reference, emulated)):
        ref_ids, arm_ids = encode(ref["text"]), encode(arm["text"])
        fields = [k for k in ("text", "finish_reason", "completion_tokens") if ref[k] != arm[k]]
        if ref_ids != arm_ids:
            fields.append("token_ids")
        if fields:
            first = next((j for j, (a, b) in enumerate(zip(ref_ids, arm_ids)) if a != b),
                         min(len(ref_ids), len(arm_ids)))
            bad.append({"prompt": i, "differs_in": fields, "first_differing_token": first,
                        "x86_64": ref["text"], "aarch64": arm["text"]})
    return bad


def wheels_from_report(report: dict) -> list[dict]:
    """What pip installed (its --report): name, version, the file it fetched and its kind.

    kind: "wheel" (a binary or pure-Python wheel from the index), "sdist" (a source archive pip
    built into a wheel on the board), "local" (a folder: the repository itself; file None).
    """
    wheels = []
    for item in report.get("install", []):
        info = item.get("download_info", {})
        url = info.get("url", "")
        local = "dir_info" in info or url.startswith("file:")
        name = None if local else url.rsplit("/", 1)[-1].split("#")[0]
        kind = "local" if local else "wheel" if name.endswith(".whl") else "sdist"
        wheels.append({"name": item["metadata"]["name"], "version": item["metadata"]["version"], "file": name,
                       "kind": kind, "url": url})
    return sorted(wheels, key=lambda w: w["name"].lower())


def source_key(root: Path, files: list[str]) -> str:
    """What the board's install is built from: pyproject, setup.py, the packages' sources (not docs, models, tests)."""
    parts = []
    for f in sorted(files):
        if f.startswith(("models/", "docs/", "tests/")) or f.endswith(".md"):
            continue
        parts += [f, (root / f).read_bytes().hex()]
    return cache_key(*parts)


# -- the install -----------------------------------------------------------------------------------------
def repo_files(root: Path) -> list[str]:
    """The files a clean clone has (tracked, or new and not ignored), as tests/test_packaging.py takes them."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True, timeout=CLI_TIMEOUT_S).stdout
    return [f for f in out.splitlines() if (root / f).is_file()]


def install(rootfs: Rootfs, log: Path) -> dict:
    """The repository copied to a fresh /opt/tierline and the doc's install run in the rootfs (skipped when the
    sources are those of the last install: `source_key`)."""
    opt = rootfs.path / OPT.lstrip("/")
    files = repo_files(ROOT)
    key = source_key(ROOT, files)
    stamp = opt / ".venv" / ".tierline-install.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return {**json.loads(stamp.read_text()), "reused": True}
    shutil.rmtree(opt, ignore_errors=True)  # a fresh board: pip's report lists every package only in a new venv
    for f in files:
        (opt / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, opt / f)
    t0 = time.monotonic()
    rootfs.run(["/bin/sh", "-c", INSTALL_SCRIPT], INSTALL_TIMEOUT_S, "the install (infra/DEVICE_INSTALL.md)", log)
    install_s = time.monotonic() - t0
    listed = json.loads(rootfs.run([f"{OPT}/.venv/bin/pip", "list", "--format", "json"], INSTALL_TIMEOUT_S,
                                   "pip list"))
    present = sorted({p["name"].lower() for p in listed} & set(FORBIDDEN))
    if present:
        raise EmulationError(f"the device install pulled {', '.join(present)}: the device extra must not")
    wheels = wheels_from_report(json.loads((rootfs.pip_cache / Path(GUEST_PIP_REPORT).name).read_text()))
    # the same files again into a folder, from pip's cache: their names and sizes on disk
    urls = [w["url"] for w in wheels if w["file"]]
    rootfs.run([f"{OPT}/.venv/bin/pip", "download", "-q", "--no-deps", "-d", "/var/cache/pip/wheelhouse", *urls],
               INSTALL_TIMEOUT_S, "pip download (the resolved wheels, for their sizes)", log)
    for w in wheels:
        w.pop("url")
        w["bytes"] = (rootfs.pip_cache / "wheelhouse" / w["file"]).stat().st_size if w["file"] else None
    venv_bytes = sum(p.stat().st_size for p in (opt / ".venv").rglob("*") if p.is_file() and not p.is_symlink())
    result = {"key": key, "command": INSTALL_COMMAND, "install_s": round(install_s, 1), "wheels": wheels,
              "forbidden_absent": list(FORBIDDEN), "venv_mib": round(venv_bytes / 2**20, 1),
              "pip": rootfs.run([f"{OPT}/.venv/bin/pip", "--version"], CLI_TIMEOUT_S, "pip --version").split()[1]}
    stamp.write_text(json.dumps(result, indent=1))
    return {**result, "reused": False}


# -- the board -----------------------------------------------------------------------------------------
def board_manifest(stack: Stack) -> dict:
    """infra/manifests/device.yaml with what a user edits (id, update key, NATS) and what the check needs."""
    data = yaml.safe_load((ROOT / "infra" / "manifests" / "device.yaml").read_text())
    data["nats"].update(url=stack.nats.url, credentials=GUEST_CREDS, tls_ca=f"{GUEST_CREDS}/ca.pem")
    data["device_agent"].update(device_id=BOARD, heartbeat_s=HEARTBEAT_S,
                                update_keys=[(stack.credentials / SIGNING_PUB).read_text().strip()])
    # free ports: an emulated process shares this machine's network, where 50053 and 9103 may be taken
    data["tiers"]["device"].update(grpc_port=0, metrics_port=0)
    for dotted, value in POLICY.items():
        data["router"][dotted.split(".", 1)[1]] = value
    return data


def provision_board(rootfs: Rootfs, stack: Stack) -> None:
    """`tierline devices provision` (the operator's side), then the seed and the CA copied onto the board."""
    cli(["devices", "provision", "--manifest", str(stack.manifest), "--device", BOARD])
    stack.nats.reload()
    accepted(stack.nats_options(device_identity(BOARD)))
    creds = rootfs.path / GUEST_CREDS.lstrip("/")
    shutil.rmtree(creds, ignore_errors=True)
    creds.mkdir(mode=0o700, parents=True)
    uid, gid = (int(x) for x in rootfs.ids("tierline").split(":"))
    for name in (f"{device_identity(BOARD)}.nk", "ca.pem"):
        shutil.copyfile(stack.credentials / name, creds / name)
        (creds / name).chmod(0o600)
    for p in (creds, *creds.iterdir()):
        shutil.chown(p, uid, gid)
    state = rootfs.path / GUEST_STATE.lstrip("/")  # a fresh board: no outbox or model left by an earlier run
    for child in state.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    (rootfs.path / GUEST_MANIFEST.lstrip("/")).write_text(yaml.safe_dump(board_manifest(stack), sort_keys=False))


def cli(args: list[str], timeout_s: float = CLI_TIMEOUT_S) -> str:
    """`tierline ...` on x86-64 (this venv): the operator's commands."""
    proc = subprocess.run([sys.executable, "-m", "tierline", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"tierline {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def healthy(port: int) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT_S)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def ask_all(port: int, prompts: list[str], model: str, max_tokens: int) -> list[dict]:
    """Each prompt through a front door, one at a time, greedy."""
    answers = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for prompt in prompts:
            t0 = time.monotonic()
            r = stub.Infer(pb.InferRequest(prompt=prompt, model=model, parameters=pb.Parameters(
                temperature=0.0, max_tokens=max_tokens)), timeout=RPC_TIMEOUT_S)
            answers.append({"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                            "completion_tokens": r.usage.completion_tokens, "tier": r.tier, "degraded": r.degraded,
                            "confidence": round(r.confidence, 6), "wall_s": round(time.monotonic() - t0, 3)})
    return answers


def fleet_record(stack: Stack, requests: int) -> dict:
    """The board as the operator's `tierline devices list` shows it, once a heartbeat counts `requests`."""
    deadline, row = time.monotonic() + FLEET_WAIT_S, None
    while time.monotonic() < deadline:
        rows = json.loads(cli(["devices", "list", "--manifest", str(stack.manifest), "--json"]))["devices"]
        row = next((r for r in rows if r["device"] == BOARD), None)
        if row and row["requests"] >= requests:
            return row
        time.sleep(HEARTBEAT_S)
    raise TimeoutError(f"the fleet's record of {BOARD} after {FLEET_WAIT_S:.0f} s: {row}")


def run_agents(rootfs: Rootfs, workdir: Path, prompts: list[str], max_tokens: int) -> dict:
    """Both agents up, the prompts through both front doors, the fleet's view of the board."""
    models = rootfs.path / OPT.lstrip("/") / "models"  # the very files the board serves
    tokenizer = load_tokenizer(models)
    model = load_index(models)["model_name"]
    with Stack(models, tiers=("device",), router=False, jetstream=True, overrides=POLICY) as stack:
        provision_board(rootfs, stack)
        t0 = time.monotonic()
        board = launch("device-aarch64", rootfs.argv([f"{OPT}/.venv/bin/python", "-m", "tierline_device_agent",
                                                      "--manifest", GUEST_MANIFEST], user="tierline"),
                       workdir / "device-aarch64.log", READY_TIMEOUT_S)
        try:
            ready_s = time.monotonic() - t0
            port = board.ready["grpc_port"]
            health = healthy(port)
            ref = ask_all(stack.port("device-0"), prompts, model, max_tokens)
            arm = ask_all(port, prompts, model, max_tokens)
            fleet = fleet_record(stack, len(prompts))
            x86_pid = next(p.popen.pid for p in stack.procs if p.name == "device-0")
            x86_rss = rss_of(x86_pid)
        finally:
            board.close()
    mismatches = compare_answers(ref, arm, lambda text: tokenizer.encode(text, bos=False))
    not_local = [i for i, a in enumerate(ref + arm) if a["tier"] != "device" or a["degraded"]]
    return {"ready": board.ready, "ready_s": round(ready_s, 1), "health": health, "prompts": len(prompts),
            "max_tokens": max_tokens, "identical": len(prompts) - len(mismatches), "mismatches": mismatches,
            "answered_elsewhere": not_local,
            "completion_tokens": sum(a["completion_tokens"] for a in arm),
            "max_confidence_delta": max(abs(a["confidence"] - b["confidence"]) for a, b in zip(ref, arm)),
            "wall_s": {"x86_64": round(sum(a["wall_s"] for a in ref), 2),
                       "aarch64_emulated": round(sum(a["wall_s"] for a in arm), 2)},
            "fleet": fleet, "x86_64_agent_rss_mib": x86_rss, "answers": {"x86_64": ref, "aarch64": arm}}


def rss_of(pid: int) -> dict:
    from tierline_device_agent.profile import proc_status_mib

    return {"rss": proc_status_mib("VmRSS", pid), "peak": proc_status_mib("VmHWM", pid)}


# -- profile, unit ------------------------------------------------------------------------------------
def profiles(rootfs: Rootfs, prompts: int) -> dict:
    """`tierline devices bench --profile pi --json` on the emulated board and on this machine."""
    args = ["devices", "bench", "--profile", "pi", "--prompts", str(prompts), "--json"]
    arm = json.loads(rootfs.run([f"{OPT}/.venv/bin/tierline", *args, "--models", f"{OPT}/models"],
                                PROFILE_TIMEOUT_S, "tierline devices bench (emulated)", user="tierline")
                     .strip().splitlines()[-1])
    x86 = json.loads(cli([*args, "--models", str(rootfs.path / OPT.lstrip("/") / "models")],
                         PROFILE_TIMEOUT_S).strip().splitlines()[-1])
    return {"aarch64_emulated": arm, "x86_64": x86}


def verify_unit(rootfs: Rootfs) -> dict:
    """`systemd-analyze verify` of the installed unit, by the rootfs's own systemd (emulated)."""
    unit = "/etc/systemd/system/tierline-device.service"
    if not (rootfs.path / "usr" / "bin" / "systemd-analyze").exists():
        return {"ok": None, "output": "systemd-analyze not in the rootfs: not verified"}
    proc = subprocess.run(rootfs.argv(["systemd-analyze", "verify", unit]), capture_output=True, text=True,
                          timeout=PROFILE_TIMEOUT_S)
    return {"ok": proc.returncode == 0, "unit": unit, "output": (proc.stdout + proc.stderr).strip()}


# -- the report --------------------------------------------------------------------------------------
def render(r: dict) -> str:
    inst, agents, prof = r.get("install", {}), r.get("agents", {}), r.get("profile", {})
    lines = [f"device-arm-check: Debian {r['rootfs']['suite']} arm64 under qemu-user ({r['rootfs']['emulation']}) "
             f"on {r['host']}; {'PASS' if r['ok'] else 'FAIL'}"]
    lines.append(f"rootfs: {r['rootfs']['path']} ({'reused' if r['rootfs']['reused'] else 'built'} "
                 f"in {r['rootfs']['s']} s)")
    if inst:
        lines.append(f"install: {inst['command']} (pip {inst['pip']}; "
                     f"{'reused' if inst['reused'] else str(inst['install_s']) + ' s'}), venv {inst['venv_mib']} MiB, "
                     f"no {' or '.join(inst['forbidden_absent'])}")
        for w in inst["wheels"]:
            size = f"{w['bytes'] / 2**20:6.2f} MiB" if w["bytes"] is not None else "     -    "
            what = {"local": "built from /opt/tierline", "sdist": f"{w['file']} (source only: built on the board)"}
            lines.append(f"  {w['name'] + '==' + w['version']:<32} {size}  {what.get(w['kind'], w['file'])}")
        total = sum(w["bytes"] or 0 for w in inst["wheels"]) / 2**20
        lines.append(f"  {len(inst['wheels'])} distributions, {total:.1f} MiB downloaded")
    if agents:
        f = agents["fleet"]
        lines.append(f"agent: ready in {agents['ready_s']} s (emulated), health {agents['health']}, fleet: "
                     f"{f['device']} {f['state']} arch {f['arch']} model {f['model']} requests {f['requests']}")
        lines.append(f"agent RSS: {f['rss_mb']} MiB aarch64 emulated (its heartbeat: the qemu process, guest "
                     f"and translator together); {agents['x86_64_agent_rss_mib']['rss']} MiB the x86-64 agent")
        lines.append(f"answers: {agents['identical']}/{agents['prompts']} identical token for token "
                     f"(x86-64 agent vs emulated aarch64 agent, greedy, max_tokens {agents['max_tokens']}, "
                     f"{agents['completion_tokens']} tokens); max |confidence delta| "
                     f"{agents['max_confidence_delta']:.2g}; wall {agents['wall_s']['x86_64']} s x86-64, "
                     f"{agents['wall_s']['aarch64_emulated']} s emulated")
        for m in agents["mismatches"]:
            lines.append(f"  MISMATCH prompt {m['prompt']} ({', '.join(m['differs_in'])}, token "
                         f"{m['first_differing_token']}): x86-64 {m['x86_64']!r} aarch64 {m['aarch64']!r}")
        if agents["answered_elsewhere"]:
            lines.append(f"  not answered by the board's own model: {agents['answered_elsewhere']}")
    for name, p in prof.items():
        tag = "EMULATED: qemu's speed, not a Pi's" if name.startswith("aarch64") else "this machine, one core"
        lines.append(f"profile pi {name} ({tag}): decode {p['decode_tokens_per_s']} tok/s, first token p50 "
                     f"{p['first_token_ms_p50']} ms p95 {p['first_token_ms_p95']} ms, load {p['load_s']} s, "
                     f"RSS {p['rss_mib']} MiB peak {p['peak_rss_mib']} MiB")
    if "unit" in r:
        u = r["unit"]
        lines.append(f"systemd-analyze verify: {'ok' if u['ok'] else 'not verified' if u['ok'] is None else 'FAILED'}"
                     + (f"\n  {u['output']}" if u["output"] else ""))
    if r.get("error"):
        lines.append(f"error: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tierline_infra.device_arm_check", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "arm64", help="the rootfs and caches")
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="benchmark prompts asked of both agents")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="completion tokens per answer at most")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "device-arm-check.json")
    a = ap.parse_args(argv)
    if a.prompts < 1 or a.max_tokens < 1:
        ap.error(f"--prompts and --max-tokens must be >= 1, got {a.prompts} and {a.max_tokens}")
    t0 = time.monotonic()
    a.workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"ok": False, "host": platform.machine()}
    rootfs = Rootfs(a.workdir)
    try:
        installed = ensure_host_tools()
        rootfs.ensure(a.workdir / "rootfs-build.log")
        report["rootfs"] = {"path": str(rootfs.path), "suite": "bookworm", "emulation": rootfs.mode,
                            "reused": rootfs.reused, "s": rootfs.build_s, "host_packages_installed": installed,
                            "qemu": subprocess.run(["qemu-aarch64-static", "--version"], capture_output=True,
                                                   text=True, timeout=CLI_TIMEOUT_S).stdout.split("\n")[0]}
        report["install"] = install(rootfs, a.workdir / "install.log")
        prompts = [q.prompt for q in generate("test", a.prompts, seed=PROMPT_SEED)]
        report["agents"] = run_agents(rootfs, a.workdir, prompts, a.max_tokens)
        report["profile"] = profiles(rootfs, a.prompts)
        report["unit"] = verify_unit(rootfs)
        agents = report["agents"]
        report["ok"] = (not agents["mismatches"] and not agents["answered_elsewhere"] and agents["health"] == "SERVING"
                        and agents["fleet"]["arch"] == "aarch64" and report["unit"]["ok"] is not False)
    except (EmulationError, RuntimeError, TimeoutError, OSError, ValueError, grpc.RpcError,
            subprocess.SubprocessError) as exc:
        report.setdefault("rootfs", {"path": str(rootfs.path), "suite": "bookworm", "emulation": rootfs.mode,
                                     "reused": rootfs.reused, "s": rootfs.build_s})
        report["error"] = f"{type(exc).__name__}: {exc}"
    report["total_s"] = round(time.monotonic() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(render(report))
    print(f"({report['total_s']} s; the whole report: {a.out})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
