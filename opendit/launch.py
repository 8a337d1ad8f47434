"""``opendit launch``: start one torchrun per host of a hostfile, over ssh, joined in one rendezvous.

    opendit launch --hostfile hosts.txt --nproc_per_node 8 -- train --data_path data.csv ...

runs on every host ``H`` of ``hosts.txt`` (in the current directory, with this Python)::

    ssh H 'cd <cwd> && exec <python> -m torch.distributed.run --nnodes <number of hosts> --nproc_per_node 8
           --rdzv_backend c10d --rdzv_endpoint <first host>:<master_port> --rdzv_id <random> -m opendit train ...'

The first host holds the rendezvous. Every argument is quoted with ``shlex``, so nothing in them reaches a
shell unquoted. Output lines are prefixed with their host. The launcher waits for all hosts and returns the
first non-zero exit code, stopping the other hosts' ssh sessions as soon as one fails.

Assumes what multi-node training needs anyway: the same paths (code, Python, data, ``--outputs``) on every
host, e.g. a shared filesystem, and password-less ssh. Hostfile: one host name per line (``user@host`` works);
``#`` starts a comment; blank lines are ignored.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

HOST_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@:\[\]-]*$")
# Environment variables every host's torchrun gets from the launching shell (ssh starts a clean environment).
FORWARDED_ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "OMP_NUM_THREADS", "PYTHONPATH", "HF_", "OPENDIT_")


class LaunchError(ValueError):
    """A bad hostfile or flag; the message names it."""


def read_hostfile(path: str | os.PathLike) -> list[str]:
    """Host names of a hostfile, in order; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"hostfile not found: {path} (--hostfile)")
    hosts: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        fields = content.split()
        if len(fields) != 1:
            raise LaunchError(f"{path} line {lineno}: expected one host name per line, got {content!r}")
        host = fields[0]
        if not HOST_RE.match(host):
            raise LaunchError(f"{path} line {lineno}: {host!r} is not a host name")
        if host in seen:
            raise LaunchError(f"{path} line {lineno}: host {host!r} is already on line {seen[host]}")
        seen[host] = lineno
        hosts.append(host)
    if not hosts:
        raise LaunchError(f"{path}: no hosts (only comments or blank lines)")
    return hosts


def _endpoint_host(host: str) -> str:
    return host.split("@", 1)[-1]  # user@host -> host


def remote_command(command: list[str], num_hosts: int, node_index: int, nproc_per_node: int, endpoint: str,
                   rdzv_id: str, python: str, cwd: str, env: dict[str, str]) -> str:
    """The shell command line one host runs: cd, then torchrun with ``command`` (an opendit subcommand)."""
    torchrun = [
        python, "-m", "torch.distributed.run",
        f"--nnodes={num_hosts}", f"--nproc_per_node={nproc_per_node}",
        "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", f"--rdzv_id={rdzv_id}",
        # Say explicitly who hosts the rendezvous store instead of letting torchrun guess from host names.
        f"--rdzv_conf=is_host={'true' if node_index == 0 else 'false'}",
        "-m", "opendit", *command,
    ]
    env_args = ["env", *(f"{k}={v}" for k, v in sorted(env.items()))] if env else []
    return f"cd {shlex.quote(cwd)} && exec {shlex.join(env_args + torchrun)}"


def _forward_output(stream, prefix: str) -> None:  # noqa: ANN001 -- a text pipe
    for line in stream:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM then SIGKILL the process group of each still running ssh (each was started in its own)."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def launch(hosts: list[str], command: list[str], nproc_per_node: int, master_port: int = 29500,
           ssh: str = "ssh", python: str | None = None, extra_env: dict[str, str] | None = None) -> int:
    """Run ``command`` under torchrun on every host; returns 0 when all succeed, else the first failure's code."""
    python = python or sys.executable
    endpoint = f"{_endpoint_host(hosts[0])}:{master_port}"
    rdzv_id = uuid.uuid4().hex[:12]
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.update(extra_env or {})
    procs: list[subprocess.Popen] = []
    threads = []
    try:
        for i, host in enumerate(hosts):
            remote = remote_command(command, len(hosts), i, nproc_per_node, endpoint, rdzv_id, python,
                                    os.getcwd(), env)
            argv = [*shlex.split(ssh), host, remote]
            # Own process group: stopping a failed run kills the ssh client and anything it started locally.
            try:
                p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True)
            except OSError as e:
                print(f"opendit launch: error: cannot run {argv[0]!r} (--ssh): {e}", file=sys.stderr)
                _stop(procs)
                return 2
            procs.append(p)
            t = threading.Thread(target=_forward_output, args=(p.stdout, f"[{host}] "), daemon=True)
            t.start()
            threads.append(t)
        while True:
            codes = [p.poll() for p in procs]
            failed = [(host, c) for host, c in zip(hosts, codes) if c not in (None, 0)]
            if failed:
                host, code = failed[0]
                print(f"opendit launch: {host} exited with code {code}; stopping the other hosts", file=sys.stderr)
                _stop(procs)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        for t in threads:
            t.join(timeout=5)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opendit launch", allow_abbrev=False,
        description="Start torchrun on every host of a hostfile over ssh: opendit launch --hostfile FILE "
                    "--nproc_per_node N -- train ...")
    parser.add_argument("--hostfile", required=True, help="one host per line; '#' comments and blank lines allowed")
    parser.add_argument("--nproc_per_node", type=int, required=True, help="processes (GPUs) per host")
    parser.add_argument("--master_port", type=int, default=29500, help="rendezvous port on the first host")
    parser.add_argument("--ssh", default="ssh", help="ssh command, e.g. 'ssh -p 2222 -o BatchMode=yes'")
    parser.add_argument("--python", default=None, help="Python on the hosts (default: this one, by path)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set an environment variable on every host (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then an opendit subcommand and its flags")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``opendit launch``: returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise LaunchError("no command: put the opendit subcommand after '--', e.g. -- train --data_path data.csv")
        if args.nproc_per_node < 1:
            raise LaunchError(f"--nproc_per_node must be >= 1, got {args.nproc_per_node}")
        if not 0 < args.master_port < 65536:
            raise LaunchError(f"--master_port must be in 1..65535, got {args.master_port}")
        if not shlex.split(args.ssh):
            raise LaunchError("--ssh is empty")
        extra_env = {}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
            extra_env[key] = value
        hosts = read_hostfile(args.hostfile)
    except LaunchError as e:
        print(f"opendit launch: error: {e}", file=sys.stderr)
        return 2
    return launch(hosts, command, args.nproc_per_node, args.master_port, args.ssh, args.python, extra_env)


if __name__ == "__main__":
    sys.exit(main())
