"""Which user a local pod runs as. When fnplane runs as root, a pod as root could read the
state dir (NATS and Redis credentials) and signal anything on the machine, so pods run as a
dedicated unprivileged user, `fnplane-pod` by default. But a pod is only contained if it can
still start: a program or workdir the pod user cannot reach (a Python under root's 0700 home,
as pyenv installs it) would fail every start. The setting says what to do then:

- `auto` (the default): the pod user where the pod's program, workdir and the paths a
  `sh -c` script names are within its reach, otherwise the pod runs as fnplane's own user,
  and that is said loudly (a warning, the pod's `run_as` in `fnplane describe`, the node's
  label in `fnplane status`);
- a user name: always that user; a pod whose program or workdir it cannot reach fails with
  the path in the way (one that fails later, at an exec inside its script, fails as any
  crashing pod does);
- `current` (or fnplane's own user name): as fnplane itself, as before.

Reachability is judged from mode bits along the path (owner, the user's own group, other),
with no supplementary groups since the pod runs without any; POSIX ACLs are not read, so
a path an ACL opens is judged unreachable (and one an ACL closes fails at exec)."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import re
import shlex
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from kernel.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_POD_USER = "fnplane-pod"
AUTO = "auto"
CURRENT = "current"
LABEL = "fnplane.io/pod-user"  # the node label `fnplane status` shows

R, W, X = stat.S_IROTH, stat.S_IWOTH, stat.S_IXOTH  # permission bits, as "other" holds them
SHELLS = frozenset({"sh", "bash", "dash", "zsh"})
_PROGRAM_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")


class PodUserError(ConfigError):
    """A setting that cannot be honoured, or a pod that cannot run as the user it must run
    as; the message names the obstacle."""


@dataclass(frozen=True)
class RunAs:
    """The user one pod runs as: `ids` None means as fnplane itself (no switch), in which
    case `why` says why a pod user was not used, when one was wanted."""

    user: str
    ids: tuple[int, int] | None = None
    home: str = ""
    why: str = ""

    def describe(self) -> str:
        return f"{self.user} ({self.why})" if self.why else self.user


# ---- reachability (stat only, no user switch) --------------------------------------------


def _allows(st: os.stat_result, uid: int, gid: int, want: int) -> bool:
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid == gid:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return bits & want == want


def blocked(path: Path, uid: int, gid: int, *, want: int) -> str | None:
    """What keeps the user uid:gid from using `path` with `want` (R|X bits), or None.
    Every directory on the way needs search (x); the path itself needs `want`. Checked
    along the path as written and along its real path (a venv's python is a symlink into
    the interpreter's own install). uid -1 stands for a user that does not exist yet and
    would own nothing: only "other" bits count."""
    for p in dict.fromkeys([Path(os.path.abspath(path)), Path(os.path.realpath(path))]):
        parts = [*reversed(p.parents), p]
        for i, part in enumerate(parts):
            need = want if i == len(parts) - 1 else X
            try:
                st = os.stat(part)
            except OSError as exc:
                return f"{part} ({exc.strerror})"
            if not _allows(st, uid, gid, need):
                return f"{p} ({part} is mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def programs(argv0: str, path_env: str) -> list[Path]:
    """What starting argv0 executes: the program found on PATH and, for a script, the
    interpreter of its `#!` line (through `/usr/bin/env NAME` too). A shell's inner
    commands (`sh -c '... exec python'`) are `shell_paths`' business."""
    found = shutil.which(argv0, path=path_env)
    if found is None:
        return []
    out = [Path(found)]
    try:
        with open(found, "rb") as f:
            head = f.read(256)
    except OSError:
        return out
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].decode(errors="replace").split()
        if words:
            interp = words[0]
            if Path(interp).name == "env" and len(words) > 1:
                out.append(Path(interp))
                interp = shutil.which(words[1], path=path_env) or words[1]
            out.append(Path(interp))
    return out


def shell_paths(argv: list[str], path_env: str) -> list[tuple[Path, int]]:
    """For `sh -c SCRIPT` (and bash, dash, zsh): the paths its script names, with the
    access each needs: every absolute path (read, and exec when executable; a file not
    there yet needs write on its dir) and every bare word that names a program on PATH
    (`exec python ...`). A guess from the words, not a parse of the shell: paths built
    from variables stay unseen. An unparsable script gives itself, which nobody reaches."""
    if Path(argv[0]).name not in SHELLS or "-c" not in argv[1:-1]:
        return []
    script = argv[argv.index("-c", 1) + 1]
    try:
        words = shlex.split(script, comments=True)
    except ValueError:
        return [(Path("/nonexistent/unparsable shell script"), R)]
    out: list[tuple[Path, int]] = []
    for word in dict.fromkeys(words):
        if word.startswith("/"):
            p = Path(word)
            if p.is_dir():
                out.append((p, X))
            elif p.exists():
                out.append((p, R | X if p.stat().st_mode & 0o111 else R))
            elif p.parent.is_dir():
                out.append((p.parent, W | X))
        elif _PROGRAM_WORD.fullmatch(word) and (found := shutil.which(word, path=path_env)):
            out.append((Path(found), X))
    return out


def obstacle(argv: list[str], path_env: str, workdir: Path, uid: int, gid: int, *,
             inside_shell: bool = True) -> str | None:
    """The first thing that keeps user uid:gid from starting argv in workdir, or None;
    with `inside_shell`, what a `sh -c` script names counts too."""
    progs = programs(argv[0], path_env)
    for i, prog in enumerate(progs):
        # The program itself needs x (and r when it is a script); interpreters need x.
        want = R | X if i == 0 and len(progs) > 1 else X
        if (why := blocked(prog, uid, gid, want=want)) is not None:
            return why
    if (why := blocked(workdir, uid, gid, want=R | X)) is not None:
        return why
    for path, want in shell_paths(argv, path_env) if inside_shell else ():
        if (why := blocked(path, uid, gid, want=want)) is not None:
            return why
    return None


# ---- the policy ----------------------------------------------------------------------------


class PodUsers:
    """The `nodes.pod_user` setting applied to each pod; shared by a process's local nodes,
    so the pod user is created once. Pure but for `pwd`, `stat` and `useradd`."""

    def __init__(self, setting: str, *, workdir: Path, euid: int | None = None) -> None:
        self.setting = setting or AUTO
        self.workdir = workdir
        self.euid = os.geteuid() if euid is None else euid
        self.me = _name_of(self.euid)
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()
        self._summary: str | None = None

    @property
    def wanted(self) -> str | None:
        """The user pods should run as, or None for fnplane's own."""
        if self.setting in (CURRENT, self.me):
            return None
        if self.setting == AUTO:
            return DEFAULT_POD_USER if self.euid == 0 else None
        return self.setting

    @property
    def forced(self) -> bool:
        return self.setting not in (AUTO, CURRENT, self.me)

    async def prepare(self, interpreter: str, path_env: str) -> str:
        """Check the setting once at start, and say what pods will run as: the summary
        `fnplane status` shows. `interpreter` is the `python` pods find first on PATH.
        Every node of the process calls it; the check and its warning happen once."""
        async with self._lock:
            if self._summary is None:
                self._summary = await self._prepare(interpreter, path_env)
            return self._summary

    async def _prepare(self, interpreter: str, path_env: str) -> str:
        wanted = self.wanted
        if wanted is None:
            if self.euid == 0:
                log.warning("pods run as root (--pod-user %s): they can read fnplane's state "
                            "dir and credentials", self.setting)
            return self.me
        if self.euid != 0:
            raise PodUserError(f"--pod-user {wanted} needs fnplane to run as root "
                               f"(it runs as {self.me}); use --pod-user current")
        if self.forced:
            await self._ids(wanted, locked=True)  # fail now on a user that does not exist
            return wanted
        why = obstacle([interpreter], path_env, self.workdir, *self._probe_ids(wanted))
        if why is None:
            return f"{wanted} (auto)"
        log.warning("pods run as %s where %s cannot reach their program or workdir, and it "
                    "cannot reach the python pods get: %s. Install Python where %s can reach "
                    "it, or pass --pod-user current to run pods as %s knowingly",
                    self.me, wanted, why, wanted, self.me)
        return (f"{wanted} (auto), but {self.me} where it cannot reach the pod's program: "
                f"python {why}")

    async def run_as(self, service: str, argv: list[str], path_env: str) -> RunAs:
        """The user this pod runs as. Raises PodUserError when a forced user cannot start it.
        A forced user is refused only what it certainly cannot start (program, workdir);
        `auto` also keeps a pod as fnplane's user when a `sh -c` script names a path out of
        the pod user's reach: auto never turns a pod that ran into one that fails."""
        wanted = self.wanted
        if wanted is None:
            return RunAs(self.me)
        why = obstacle(argv, path_env, self.workdir, *self._probe_ids(wanted),
                       inside_shell=not self.forced)
        if why is not None:
            if self.forced:
                raise PodUserError(f"cannot start {argv[0]!r} as {wanted} (--pod-user {wanted}):"
                                   f" it cannot reach {why}")
            reason = f"{wanted} cannot reach {why}"
            if service not in self._warned:
                self._warned.add(service)
                log.warning("pods of %s run as %s: %s", service, self.me, reason)
            return RunAs(self.me, why=reason)
        try:
            uid, gid, home = await self._ids(wanted)
        except PodUserError as exc:
            if self.forced:
                raise
            return RunAs(self.me, why=str(exc))
        return RunAs(wanted, (uid, gid), home)

    def _probe_ids(self, user: str) -> tuple[int, int]:
        """The user's ids for a reachability check; -1 for one not created yet."""
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return -1, -1
        return pw.pw_uid, pw.pw_gid

    async def _ids(self, user: str, *, locked: bool = False) -> tuple[int, int, str]:
        """uid, gid and home of `user`; the default pod user is created on first use
        (under the lock: nodes starting pods at once create it once)."""
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            if user != DEFAULT_POD_USER:
                raise PodUserError(f"no user {user!r} on this machine") from None
            if locked:
                await _create_system_user(user)
            else:
                async with self._lock:
                    await _create_system_user(user)
            pw = pwd.getpwnam(user)
        return pw.pw_uid, pw.pw_gid, pw.pw_dir


async def _create_system_user(user: str) -> None:
    """A system user with its own group, no home and no login shell (unless made already
    by a node that held the lock first)."""
    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    try:
        proc = await asyncio.create_subprocess_exec(
            useradd, "--system", "--no-create-home", "--user-group",
            "--shell", "/usr/sbin/nologin", user,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
    except (OSError, TimeoutError) as exc:
        raise PodUserError(f"cannot create user {user}: {exc}") from None
    if proc.returncode != 0:
        try:
            pwd.getpwnam(user)  # made meanwhile (another fnplane, or a node under our lock)
        except KeyError:
            raise PodUserError(f"cannot create user {user}: "
                               f"{out.decode(errors='replace').strip()}") from None
    log.warning("created system user %s for pods", user)


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
