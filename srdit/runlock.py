"""Who may train a run directory now: the run lock, and the diverged marker.

The run lock (`RUN/trainer.lock`) is held by the live trainer of a run, rank 0 only, from start-up
to exit. It records who holds it: Slurm job id (and restart count), host, pid, the pid's start
time and boot id (so a reused pid is not mistaken for the holder), user and start time. A second
trainer on the same run refuses at once with an error that names the holder (`RunLocked`).

A lock whose holder is gone is taken over: the holder is gone when
- it ran on this host and its pid is dead, belongs to another process now, or the host rebooted;
- it ran in this very Slurm job before a requeue (same job id, earlier run of the job);
- its Slurm job no longer runs (squeue, else sacct: finished, cancelled, requeued and pending).
When nothing can tell (another host without Slurm, no Slurm tools answering) the lock is kept
and the error says how to remove it by hand.

Taking the lock is atomic: the holder's record is written to a private file and hard-linked to
`trainer.lock` (`os.link` fails if the name exists, on local and network file systems alike).
Taking over a stale lock is serialised by a second link-based lock (`trainer.lock.takeover`):
the taker re-reads the lock under it and removes it only if it is still the same stale record
(its nonce), so of two trainers that find the same stale lock exactly one gets the run and the
other refuses, naming the winner. Every take, take-over and release is appended to
`RUN/trainers.jsonl`.

The diverged marker (`RUN/diverged.json`) is written by the trainer when the loss or gradient
norm became non-finite (exit 3). While it exists the run is not trained again, neither by
`srdit train` nor by the workflow's retries (the segment wrapper checks it before starting
anything); delete it to train the run again.
"""
from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOCK_FILE = "trainer.lock"
TAKEOVER_FILE = "trainer.lock.takeover"
HISTORY_FILE = "trainers.jsonl"
DIVERGED_FILE = "diverged.json"

# Slurm job states in which the job's processes may still run (and hold the lock). PENDING is not
# among them: a pending job (e.g. requeued) runs no trainer; when it starts it takes the lock anew.
SLURM_ALIVE = {"RUNNING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
# How long a holder whose job is COMPLETING (its processes being stopped) is waited for before
# the lock counts as held.
COMPLETING_WAIT_S = 120.0
# A take-over lock older than this was left by a taker that died inside the few milliseconds it
# holds it; it is removed.
TAKEOVER_STALE_S = 30.0


class RunLocked(RuntimeError):
    """The run is held by a live (or not provably dead) trainer."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder


class RunDiverged(RuntimeError):
    """The run diverged (diverged.json): it is not trained again until the marker is removed."""


# --------------------------------------------------------------------------------------------
# Who is this process
# --------------------------------------------------------------------------------------------

def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (/proc/PID/stat field 22), or None when
    the process does not exist (or this is not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _env_job_id(environ) -> str | None:
    return environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or None


@dataclass
class Holder:
    """The record in trainer.lock."""
    host: str
    pid: int
    job_id: str | None = None          # SLURM_JOB_ID (raw id, also for array tasks)
    restart_count: int | None = None   # SLURM_RESTART_COUNT: which run of a requeued job
    pid_start: int | None = None
    boot_id: str | None = None
    user: str | None = None
    start_time: str = ""
    started: float = 0.0               # time.time() when taken
    nonce: str = field(default_factory=lambda: secrets.token_hex(8))
    argv: list[str] | None = None

    @classmethod
    def me(cls, argv: list[str] | None = None, environ=None) -> "Holder":
        env = os.environ if environ is None else environ
        restart = env.get("SLURM_RESTART_COUNT")
        try:
            user = getpass.getuser()
        except Exception:
            user = None
        now = time.time()
        return cls(host=socket.gethostname(), pid=os.getpid(), job_id=_env_job_id(env),
                   restart_count=int(restart) if restart and restart.isdigit() else None,
                   pid_start=pid_start_ticks(os.getpid()), boot_id=_boot_id(), user=user,
                   start_time=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)), started=now,
                   argv=argv)

    @classmethod
    def from_dict(cls, d: dict) -> "Holder":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def describe(self) -> str:
        who = f"Slurm job {self.job_id}" if self.job_id else "a trainer outside Slurm"
        user = f" of user {self.user}" if self.user else ""
        return f"{who}{user} on {self.host}, pid {self.pid}, since {self.start_time}"


# --------------------------------------------------------------------------------------------
# Is the holder alive?
# --------------------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def slurm_job_state(job_id: str) -> str | None:
    """The Slurm state of a job ("RUNNING", "COMPLETED", ...), "GONE" when Slurm no longer knows
    it, or None when Slurm cannot be asked (no squeue/sacct, or they fail)."""
    out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"]) if shutil.which("squeue") else None
    if out is not None:
        if out.returncode == 0:
            states = out.stdout.split()
            if states:
                return states[0]
        elif "invalid job id" not in (out.stderr or "").lower():
            out = None                                     # squeue failed: try sacct
    # squeue forgets a job MinJobAge after it ends; sacct remembers it (where accounting runs)
    acct = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"]) if shutil.which("sacct") else None
    if acct is not None and acct.returncode == 0:
        states = acct.stdout.split()
        if states:
            return states[-1].upper()                      # "CANCELLED by 0" -> CANCELLED
    if out is not None:                                    # squeue answered: it does not know the job
        return "GONE"
    return None


def holder_state(holder: Holder, me: Holder | None = None) -> tuple[str, str]:
    """("alive" | "ending" | "gone" | "unknown", why) for the holder of a lock, seen from `me`
    ("ending": its Slurm job is COMPLETING, i.e. its processes are being stopped)."""
    me = me or Holder.me()
    if holder.job_id and holder.job_id == me.job_id:
        if (holder.restart_count is not None and me.restart_count is not None
                and holder.restart_count != me.restart_count):
            return "gone", f"an earlier run of this requeued job ({holder.job_id}, run {holder.restart_count})"
        if holder.host != me.host:
            return "gone", f"an earlier run of this job ({holder.job_id}) on {holder.host}"
    if holder.host == me.host:
        if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
            return "gone", f"{holder.host} rebooted since"
        ticks = pid_start_ticks(holder.pid)
        if ticks is None:
            return "gone", f"pid {holder.pid} no longer runs on {holder.host}"
        if holder.pid_start is not None and ticks != holder.pid_start:
            return "gone", f"pid {holder.pid} on {holder.host} is another process now"
        return "alive", f"pid {holder.pid} runs on {holder.host}"
    if holder.job_id:
        state = slurm_job_state(holder.job_id)
        if state is None:
            return "unknown", f"Slurm cannot be asked about job {holder.job_id} (squeue/sacct failed)"
        if state in SLURM_ALIVE:
            return "alive", f"Slurm job {holder.job_id} is {state}"
        if state == "COMPLETING":
            return "ending", f"Slurm job {holder.job_id} is {state}"
        return "gone", f"Slurm job {holder.job_id} is {state}"
    return "unknown", f"it ran on another host ({holder.host}) outside Slurm"


# --------------------------------------------------------------------------------------------
# The lock file
# --------------------------------------------------------------------------------------------

def _read(path: Path) -> Holder | None:
    try:
        return Holder.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise RunLocked(f"{path} exists but cannot be read ({e}); if no trainer runs on this run, "
                        f"delete it") from None


def read_lock(run_dir: str | Path) -> dict | None:
    """The lock's record (job_id, host, pid, start_time, ...) as a dict, or None when unlocked."""
    holder = _read(Path(run_dir) / LOCK_FILE)
    return asdict(holder) if holder else None


def _history(run_dir: Path, event: str, holder: Holder, **extra) -> None:
    line = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job_id": holder.job_id,
            "host": holder.host, "pid": holder.pid, "nonce": holder.nonce, **extra}
    try:
        with open(run_dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        pass


def _link_new(path: Path, record: dict) -> bool:
    """Create `path` holding `record`, atomically; False when it exists already."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    with open(tmp, "w") as f:
        f.write(json.dumps(record, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class _Takeover:
    """The short-lived lock that serialises the take-over of a stale run lock."""

    def __init__(self, run_dir: Path, me: Holder):
        self.path, self.me = run_dir / TAKEOVER_FILE, me

    def __enter__(self):
        deadline = time.monotonic() + 2 * TAKEOVER_STALE_S
        while not _link_new(self.path, asdict(self.me)):
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > TAKEOVER_STALE_S:
                self.path.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise RunLocked(f"{self.path} stays taken; if no trainer is starting on this run, delete it")
            else:
                time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _refusal(path: Path, holder: Holder, state: str, why: str) -> RunLocked:
    run_dir = path.parent
    if state == "unknown":
        return RunLocked(f"run {run_dir} is locked by {holder.describe()} and whether it still runs cannot "
                         f"be checked ({why}). If no trainer runs on this run, delete {path}", asdict(holder))
    stop = f"scancel {holder.job_id}" if holder.job_id else f"kill {holder.pid} on {holder.host}"
    return RunLocked(f"run {run_dir} is being trained by {holder.describe()} ({why}); a second trainer on "
                     f"the same run would corrupt it. Wait for that trainer to end, or stop it ({stop}: it "
                     f"checkpoints first)", asdict(holder))


def check_unlocked(run_dir: str | Path) -> None:
    """RunLocked when a live trainer holds the run (or one that cannot be checked); an absent or
    stale lock passes (the trainer takes it over). Takes nothing."""
    path = Path(run_dir) / LOCK_FILE
    holder = _read(path)
    if holder is None:
        return
    state, why = holder_state(holder)
    if state in ("alive", "unknown"):
        raise _refusal(path, holder, state, why)


class RunLock:
    """The run lock of one run directory, held by this process once `acquire` returned."""

    def __init__(self, run_dir: str | Path, argv: list[str] | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.me = Holder.me(argv)
        self.held = False

    def acquire(self, completing_wait_s: float = COMPLETING_WAIT_S) -> "RunLock":
        """Take the lock, taking over a stale one; RunLocked names the holder otherwise."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        waited_until = time.monotonic() + completing_wait_s
        while True:
            if _link_new(self.path, asdict(self.me)):
                self.held = True
                _history(self.run_dir, "take", self.me)
                return self
            holder = _read(self.path)
            if holder is None:                  # released in between: try again
                continue
            state, why = holder_state(holder, self.me)
            if state == "ending" and time.monotonic() < waited_until:
                time.sleep(2.0)                 # its processes are being stopped: wait for them
                continue
            if state != "gone":
                raise _refusal(self.path, holder, state, why)
            with _Takeover(self.run_dir, self.me):
                current = _read(self.path)
                if current is not None and current.nonce == holder.nonce:
                    self.path.unlink()
                    _history(self.run_dir, "take_over", self.me, previous=asdict(holder), reason=why)
                # else: someone released or took it meanwhile; look again

    def release(self) -> None:
        """Remove the lock if it is still this process's (never another trainer's)."""
        if not self.held:
            return
        self.held = False
        try:
            current = _read(self.path)
        except RunLocked:
            return
        if current is not None and current.nonce == self.me.nonce:
            self.path.unlink(missing_ok=True)
            _history(self.run_dir, "release", self.me)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# The diverged marker
# --------------------------------------------------------------------------------------------

def mark_diverged(run_dir: str | Path, step: int, detail: str) -> Path:
    from srdit.checkpoint import atomic_write_json
    path = Path(run_dir) / DIVERGED_FILE
    me = Holder.me()
    atomic_write_json(path, {"step": step, "detail": detail, "time": me.start_time, "job_id": me.job_id,
                             "host": me.host})
    return path


def check_not_diverged(run_dir: str | Path) -> None:
    """RunDiverged when the run carries the diverged marker."""
    path = Path(run_dir) / DIVERGED_FILE
    if not path.exists():
        return
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    raise RunDiverged(
        f"run {Path(run_dir)} diverged at step {info.get('step', '?')} ({info.get('time', '?')}): "
        f"{info.get('detail', 'see its logs')}. It is not trained again (retries are for time limits, "
        f"preemption and node failures). Fix the cause, then delete {path} to resume from the last "
        f"good checkpoint")
