"""A real Slurm cluster on loopback for deploy tests.

`SlurmCluster` brings up munged, slurmctld and one slurmd per fake node (Debian's slurm-wlm
runs several slurmd on one host: `NodeName=node[1-N] NodeHostname=localhost NodeAddr=127.0.0.1`
with a distinct port each). Every state, spool, log, pid and socket path lives in one temp dir;
munged gets its own socket there, so a system munged (if any) is never touched.

Teardown is `scontrol shutdown`, then SIGTERM/SIGKILL by PID of every daemon we started and of
every process that carries our `SLURM_CONF` in its environment (step daemons and tasks that the
daemons spawned on our behalf). `leftover_pids()` lets a test assert that nothing survived. `SallocDeployment` runs
deploy/slurm/triad_srun.sh inside an `salloc` allocation of such a cluster, the way a user does.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRIAD_SRUN = REPO / "deploy" / "slurm" / "triad_srun.sh"
STOP_SH = REPO / "deploy" / "slurm" / "stop.sh"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "srun", "salloc", "sbatch", "scontrol", "sinfo", "munged")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_slurm_installed() -> str | None:
    """Install the Debian packages when missing and we are root; None if ready, else why not."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return None
    if os.geteuid() != 0:
        return ("Slurm is not installed and installing it needs root: run "
                "`apt-get install -y --no-install-recommends " + " ".join(PACKAGES) + "`")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            return f"apt-get install of Slurm failed: {res.stderr[-500:]}"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass(frozen=True)
class SlurmClusterConfig:
    """Shape of the fake cluster."""

    num_nodes: int = 2
    cpus_per_node: int = 16  # declared, not real: SlurmdParameters=config_overrides
    memory_mb: int = 16000
    start_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.cpus_per_node < 1:
            raise ValueError("num_nodes and cpus_per_node must be >= 1")


class SlurmCluster:
    """A running single-host Slurm cluster with `num_nodes` fake nodes named node1..nodeN."""

    def __init__(self, root: Path, config: SlurmClusterConfig = SlurmClusterConfig()) -> None:
        self.root = Path(root)
        self.config = config
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        self.node_names = [f"node{i}" for i in range(1, config.num_nodes + 1)]

    # ---- bring-up -------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        """Start munged, slurmctld, the slurmds; wait until every node is idle."""
        try:
            self._make_dirs()
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", str(self.conf_path)])
            self._wait_for(self._ctld_responds, "slurmctld to answer `scontrol ping`")
            for name in self.node_names:
                self._spawn(f"slurmd-{name}",
                            [_sbin("slurmd"), "-D", "-f", str(self.conf_path), "-N", name])
            self._wait_for(self._all_idle, "all nodes to be idle")
        except Exception:
            print(self.logs())
            self.stop()
            raise
        return self

    def _make_dirs(self) -> None:
        # munged (running as the munge user) must traverse the root; slurmd creates no parents.
        self.root.chmod(0o755)
        for sub in ("etc", "state", "log", "run", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(exist_ok=True)
        munge_dir = self.root / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge = pwd.getpwnam("munge")
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        for path, mode in ((munge_dir, 0o755), (key, 0o600)):
            os.chown(path, munge.pw_uid, munge.pw_gid)
            path.chmod(mode)

    def _start_munged(self) -> None:
        d = self.root / "munge"
        args = [_sbin("munged"), "-F", f"--socket={self.munge_socket}",
                f"--key-file={d / 'munge.key'}", f"--log-file={d / 'munged.log'}",
                f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"]
        # munged refuses to run as root with this layout; run it as the munge user.
        self._spawn("munged", args, user="munge", group="munge")
        self._wait_for(self.munge_socket.exists, "munged's socket")

    def _write_conf(self) -> None:
        self.conf_path.write_text(self._conf_text())

    def _conf_text(self) -> str:
        r, c = self.root, self.config
        ports = [free_port() for _ in self.node_names]
        host = socket.gethostname().split(".")[0]
        lines = [
            "ClusterName=triadtest", f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "ReturnToService=2", "SlurmdParameters=config_overrides", "EnforcePartLimits=ALL",
            "CommunicationParameters=NoInAddrAny", "MailProg=/bin/true", "MpiDefault=none",
            "SwitchType=switch/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill", "KillWait=5", "MinJobAge=5", "InactiveLimit=0",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "SlurmctldDebug=info", "SlurmdDebug=info",
        ]
        for name, port in zip(self.node_names, ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 "
                         f"Port={port} CPUs={c.cpus_per_node} RealMemory={c.memory_mb} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, args: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self._procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env(), start_new_session=True, **kw)

    def _wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"Slurm test cluster: {dead} exited while waiting for {what}")
            if predicate():
                return
            time.sleep(0.2)
        raise TimeoutError(f"Slurm test cluster: timed out waiting for {what}")

    def _ctld_responds(self) -> bool:
        res = self.run(["scontrol", "ping"], timeout=10, check=False)
        return res.returncode == 0 and "UP" in res.stdout

    def _all_idle(self) -> bool:
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10, check=False)
        states = dict(line.split() for line in res.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.node_names)

    # ---- use ------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """The environment a Slurm client (srun, salloc, sbatch, scontrol) needs."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf_path)
        env.update(extra)
        return env

    def run(self, args: list[str], timeout: float = 60, check: bool = True,
            **extra_env: str) -> subprocess.CompletedProcess:
        """Run a Slurm client command under `timeout` (a hung client must not hang the test)."""
        cmd = ["timeout", "-k", "5", str(int(timeout)), *args]
        res = subprocess.run(cmd, env=self.env(**extra_env), capture_output=True, text=True)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n"
                               f"{res.stderr}\n{self.logs()}")
        return res

    def logs(self, tail: int = 4000) -> str:
        """The last `tail` characters of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.is_file():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ---- teardown -------------------------------------------------------------------------
    def leftover_pids(self) -> list[int]:
        """PIDs of live processes that belong to this cluster (our SLURM_CONF or temp dir)."""
        marker_env = f"SLURM_CONF={self.conf_path}".encode()
        marker_cmd = str(self.root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            if _proc_has(entry, marker_env, marker_cmd):
                found.append(int(entry.name))
        return found

    def stray_pids(self) -> list[int]:
        """`leftover_pids()` less the daemons themselves: what jobs and steps left running."""
        daemons = {p.pid for p in self._procs.values()}
        return [pid for pid in self.leftover_pids()
                if pid not in daemons and not _is_ctld_helper(pid)]

    def stop(self) -> None:
        """Shut down every daemon and kill whatever is left, by PID."""
        if self.conf_path.exists() and "slurmctld" in self._procs:
            self.run(["scontrol", "shutdown"], timeout=15, check=False)
        for name, proc in self._procs.items():
            if name != "munged":  # scontrol shutdown does not stop munged
                _wait_or_kill(proc, grace_s=10)
        if "munged" in self._procs:
            _wait_or_kill(self._procs["munged"], grace_s=0)
        for _ in range(3):
            pids = self.leftover_pids()
            if not pids:
                break
            _signal_all(pids, signal.SIGTERM)
            time.sleep(1.0)
            _signal_all(self.leftover_pids(), signal.SIGKILL)
        for proc in self._procs.values():
            proc.wait(timeout=5)


def _is_ctld_helper(pid: int) -> bool:
    """slurmctld forks a long-lived `slurmctld: slurmscriptd` helper: part of the daemon."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"slurmctld:")
    except OSError:
        return False


def _proc_has(entry: Path, marker_env: bytes, marker_cmd: bytes) -> bool:
    try:
        if (entry / "stat").read_text().split(")")[-1].split()[0] == "Z":
            return False  # zombie: already dead, only waiting for its parent to reap it
        if marker_cmd in (entry / "cmdline").read_bytes():
            return True
        return marker_env in (entry / "environ").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False


def _wait_or_kill(proc: subprocess.Popen, grace_s: float) -> None:
    """Wait `grace_s` for `proc` to exit by itself, then SIGTERM, then SIGKILL."""
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            action()
        try:
            proc.wait(timeout=grace_s if action is None else 5)
            return
        except subprocess.TimeoutExpired:
            continue


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class SallocDeployment:
    """`salloc -N<nodes> bash deploy/slurm/triad_srun.sh` in the background, on free ports."""

    def __init__(self, cluster: SlurmCluster, run_dir: Path, nodes: int = 2, **env: str) -> None:
        self.cluster, self.run_dir, self.nodes = cluster, run_dir, nodes
        self.http_port = free_port()
        # Fake nodes share one network: every port must be free on this host, and the
        # nodes' names do not resolve, so the addresses are given.
        self.env = {"HEAD_ADDR": "127.0.0.1", "NODE_ADDR": "127.0.0.1", "RUN_DIR": str(run_dir),
                    "HTTP_PORT": str(self.http_port), "TRIAD_ETCD_PORT": str(free_port()),
                    "TRIAD_ETCD_PEER_PORT": str(free_port()), "TRIAD_NATS_PORT": str(free_port()),
                    "STOP_TIMEOUT": "30", **env}
        self.log_path = run_dir.parent / f"{run_dir.name}.salloc.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, limit_s: int = 900) -> "SallocDeployment":
        cmd = ["timeout", "-k", "10", str(limit_s), "salloc", f"-N{self.nodes}",
               "--job-name=triad-test", "bash", str(TRIAD_SRUN)]
        self.proc = subprocess.Popen(cmd, env=self.cluster.env(**self.env), cwd=REPO,
                                     stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        """Until triad_srun.sh says it is up; fails with its output and the daemon logs."""
        deadline = time.monotonic() + timeout
        while not (self.run_dir / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"deployment not ready (rc={self.proc.poll()}):\n"
                                     f"{self.output()}\n{self.worker_logs()}\n{self.cluster.logs()}")
            time.sleep(0.5)

    def worker_logs(self, tail: int = 3000) -> str:
        logs = sorted((self.run_dir / "logs").glob("*.log")) if self.run_dir.exists() else []
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-tail:]}" for p in logs)

    def stop(self, timeout: float = 120) -> int:
        """stop.sh (SIGTERM to triad_srun.sh), then wait for salloc; returns salloc's exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None and (self.run_dir / "triad_srun.pid").exists():
            subprocess.run(["bash", str(STOP_SH), str(self.run_dir), str(int(timeout))],
                           capture_output=True, timeout=timeout + 10)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the `timeout` wrapper: it passes SIGKILL on to salloc
            return self.proc.wait(timeout=10)


def wait_no_strays(cluster: SlurmCluster, timeout: float = 20.0) -> list[int]:
    """Job and step processes still alive after `timeout` (slurmstepd exits a moment after)."""
    deadline = time.monotonic() + timeout
    while (strays := cluster.stray_pids()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return strays


def squeue_jobs(cluster: SlurmCluster) -> str:
    return cluster.run(["squeue", "-h", "-o", "%i %j %T"], timeout=20).stdout.strip()


def describe_pids(pids: list[int]) -> str:
    """'PID: command line' for each, for failure messages."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "(gone)"
        out.append(f"{pid}: {cmd}")
    return "; ".join(out)
