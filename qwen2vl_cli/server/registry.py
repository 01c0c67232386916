"""Running sessions, found through state files in the user's runtime directory and checked with /health.

Each session records a secret token in its state file (readable by its user only); /health answers a
client's random challenge with an HMAC of it, so a client knows the process on a recorded port is the
session it recorded, not whatever took the port since. Light on purpose: commands in client mode use
this without importing torch."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import signal
import time
from pathlib import Path

HEALTH_TIMEOUT_S = 1.0
DEFAULT_PORT = 8901
PROOF_HEADER = "X-Qwen2VL-Challenge"
# a started session runs in the user's working directory (relative paths in its config) but not from it: `python
# -m` puts it first on the path, so a folder named qwen2vl_cli there (a dataset, a cloned repository) would run
LAUNCH = ("# qwen2vl session\nimport sys\nif sys.path[:1] == ['']:\n    del sys.path[0]\n"  # the comment: what `ps` shows
          "from qwen2vl_cli.server.app import run_launched\nrun_launched()")
READY_FD = "QWEN2VL_READY_FD"  # a started session's end of the pipe on which it says it serves
SOCKET_FD = "QWEN2VL_SOCKET_FD"  # a started session's socket, bound and listening by its starter
LOGS_KEPT_S = 7 * 24 * 3600  # a started session's log (named in its error if it fails) is kept a week


def proof(token: str, challenge: str) -> str:
    return hmac.new(token.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def state_dir() -> Path:
    """$QWEN2VL_STATE_DIR, else $XDG_RUNTIME_DIR/qwen2vl, else ~/.cache/qwen2vl/run."""
    if os.environ.get("QWEN2VL_STATE_DIR"):
        return Path(os.environ["QWEN2VL_STATE_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "qwen2vl"
    return Path.home() / ".cache" / "qwen2vl" / "run"


def state_folder() -> Path:
    """state_dir(), made (0700) where it is missing; ServerError where it cannot be (a file, a read-only home)."""
    from ..errors import ServerError

    folder = state_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ServerError(str(folder), f"cannot keep sessions' records there ({exc.strerror}); "
                                       "set QWEN2VL_STATE_DIR to a folder you can write in") from None
    return folder


def write_state(info: dict) -> Path:
    return write_private(state_dir() / f"{info['pid']}.json", json.dumps(info))


def write_private(path: Path, text: str) -> Path:
    """`text` into `path` in the user's own state folder (0700; the file 0600), written whole and renamed: a reader
    never sees half a file. OSError where it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
    return path


def read_state(pid: int) -> dict | None:
    """The record a server wrote once it was bound, or None before that."""
    try:
        return json.loads((state_dir() / f"{pid}.json").read_text())
    except (OSError, ValueError):
        return None


def remove_state(pid: int) -> None:
    try:
        (state_dir() / f"{pid}.json").unlink()
    except OSError:  # never written, or not there to remove
        pass


def _alive(pid: int) -> bool:
    """The process exists and has not exited (an exited child not yet reaped is a zombie: gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def health(url: str, api_key: str | None = None, timeout: float = HEALTH_TIMEOUT_S, token: str | None = None,
           pid: int | None = None) -> dict | None:
    """The server's /health answer, or None when it does not answer as a qwen2vl server; with `token`
    (and `pid`), None too unless it proves it is the session that recorded them."""
    from ..transport import TransportError, http

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    challenge = secrets.token_hex(16)
    if token:
        headers[PROOF_HEADER] = challenge
    try:
        response = http(url).get(url.rstrip("/") + "/health", timeout=timeout, headers=headers)
        answer = response.json() if response.status_code == 200 else None
    except (TransportError, ValueError):
        return None
    if not isinstance(answer, dict):
        return None
    if token and not (hmac.compare_digest(str(answer.get("proof", "")), proof(token, challenge))
                      and (pid is None or answer.get("pid") == pid)):
        return None
    return answer


def list_servers(api_key: str | None = None) -> list[dict]:
    """Every recorded server that is still alive, with its live /health facts; stale records are removed."""
    servers = []
    folder = state_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if not path.stem.isdigit():  # a session's record is PID.json; the folder holds other files too
            continue
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("pid") != int(path.stem) or not isinstance(info.get("url"), str):
            continue  # not a record a session wrote
        if not _alive(info["pid"]):
            path.unlink(missing_ok=True)
            continue
        # a record without a token (an older session) can prove nothing: "-" never matches a proof
        info["health"] = health(info["url"], info.get("api_key") or api_key, token=info.get("token") or "-",
                                pid=int(info["pid"]))
        servers.append(info)
    return servers


def find_server(spec, api_key: str | None = None) -> dict | None:
    """A healthy local session that serves `spec` (a types.ModelSpec): its model, with its settings (serves); the
    one started with exactly these settings first."""
    found = [info for info in list_servers(api_key) if info["health"] and serves(info["health"], spec)]
    found.sort(key=lambda info: info["health"].get("settings") != spec.settings())
    return found[0] if found else None


def serves(health: dict, spec) -> bool:
    """The session whose /health this is serves `spec`: the same model, and every setting asked for (not auto;
    for --quantize, given) is the one the session was started with or the one its auto became. A bfloat16 or
    eager-attention one-liner is never answered by a float32 or sdpa session, nor any by another qwen2vl version."""
    from .. import __version__

    if health.get("model") != spec.model or health.get("version") != __version__:  # after an upgrade: not the old code
        return False
    started, resolved = health.get("settings") or {}, health.get("resolved") or {}
    if spec.quantize is not None and spec.quantize != started.get("quantize"):
        return False

    def named(value):
        return "cuda" if value == "cuda:0" else value  # the first GPU, named either way

    return all(asked == "auto" or named(asked) in (named(started.get(key)), named(resolved.get(key)))
               for key, asked in (("device", spec.device), ("dtype", spec.dtype), ("attn", spec.attn)))


class Launched:
    """A session serving `config` (a ServerConfig), started detached: its socket is bound here and handed over (a
    taken port is the usage error a foreground `serve` gives, at once), its config goes pickled on its stdin (no
    command line to parse again; the API key on no command line and in no environment), its output to a log
    beside the state files. `ready()` waits until it says it serves and returns its record; `stop()` ends it."""

    def __init__(self, config) -> None:
        import pickle
        import subprocess
        import sys

        self.api_key = config.api_key
        folder = state_folder()
        sock = config.listen()
        _prune_logs(folder)
        # the starting command's pid too: two sessions started in the same second (two models) get a log each
        self.log_path = folder / f"serve-{int(time.time())}-{os.getpid()}.log"
        self.pipe, told = os.pipe()  # it writes a byte there once it serves; its exit closes it
        try:
            with _interrupt_deferred() as interrupted, open(self.log_path, "ab") as log:
                # the model after the code is only for `ps` to show (the config on stdin is what the session reads)
                fds = {READY_FD: told, SOCKET_FD: sock.fileno()}
                self.process = subprocess.Popen([sys.executable, "-c", LAUNCH, config.spec.model],
                                                stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True,
                                                pass_fds=tuple(fds.values()),
                                                env={**os.environ, **{name: str(fd) for name, fd in fds.items()}})
                with contextlib.suppress(OSError):  # it exited already: ready() says why
                    self.process.stdin.write(pickle.dumps(config))
                    self.process.stdin.close()
        except BaseException:
            self._close_pipe()
            raise
        finally:  # the session's now, and only its: its exit closes them
            os.close(told)
            sock.close()
        if interrupted:
            self.stop()
            raise KeyboardInterrupt

    def ready(self, timeout: float = 900.0) -> dict:
        """Its record, once it says it serves and answers /health. ServerError when it exits first or is not ready
        in time (then it is stopped); stopped too on Ctrl-C: nothing the user did not see start is left running."""
        import select

        from ..errors import ServerError

        process, deadline, told = self.process, time.monotonic() + timeout, False
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise ServerError("serve", f"the server exited ({tail[0]}); log: {self.log_path}")
                if not told:  # waiting on the pipe, not polling: a first one-liner asks the moment it can
                    if not select.select([self.pipe], [], [], min(0.5, max(0.0, deadline - time.monotonic())))[0]:
                        continue
                    told = True  # a byte (it serves) or the end of the pipe (it is exiting: seen above next)
                    os.read(self.pipe, 1)
                state = read_state(process.pid)
                if state and health(state["url"], self.api_key, token=state.get("token"), pid=process.pid):
                    return state
                time.sleep(0.05)
        except KeyboardInterrupt:
            self.stop()
            raise
        finally:
            self._close_pipe()
        self.stop()
        raise ServerError("serve", f"not ready after {timeout:.0f}s (stopped); log: {self.log_path}")

    def stop(self) -> None:
        self.process.terminate()
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None


def signal_ready(fd: int) -> None:
    """In a started session, once it serves: tell its starter (Launched.ready) on the pipe it was given."""
    try:
        os.write(fd, b"1")
    except OSError:  # the starter is gone (interrupted): nothing to tell
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _interrupt_deferred():
    """Ctrl-C noted, not raised, inside (a list: [True] when it came); in the main thread only, where signals are
    handled. A session's spawn is one: an interrupt inside Popen (which waits for the child's exec) would leave a
    session running that nothing owns."""
    interrupted: list[bool] = []
    previous = None
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored or handled
        try:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(True))
        except ValueError:  # not the main thread
            pass
    try:
        yield interrupted
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _prune_logs(folder: Path) -> None:
    """Started sessions' logs untouched for LOGS_KEPT_S go: one-liners start sessions all day, each with a log."""
    cutoff = time.time() - LOGS_KEPT_S
    for path in folder.glob("serve-*.log"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def stop_server(info: dict, timeout: float = 30.0) -> bool:
    """SIGTERM, wait for the process to end; True when it did."""
    pid = int(info["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        remove_state(pid)
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            remove_state(pid)
            return True
        time.sleep(0.1)
    return False
