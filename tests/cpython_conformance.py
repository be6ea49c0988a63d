"""CPython's own subprocess tests against remowt.Popen: counts per connection kind (not part of the test run).

    python3 tests/cpython_conformance.py [--kinds subprocess,local,ssh] [--timeout 60] [-k TEXT] [--log FILE]

Each kind runs in a child process of this script, which imports
``test.test_subprocess`` (CPython's Lib/test/test_subprocess.py from this
interpreter's ``test`` package: Debian's ``libpython3.X-testsuite``, part of
every python.org or pyenv build) and runs every case once with
``subprocess.Popen`` and its helpers swapped for a connection's
(:func:`remowt.patch`, so the module's own ``subprocess.Popen`` subclasses
are remowt's too): ``subprocess`` itself as the baseline, ``local`` (a local
agent) and ``ssh`` (as root over a test sshd on 127.0.0.1, from
``tests/sshd.py``: run as root after ``scripts/setup-test-host.sh``; the
target is this machine, so paths and pids are shared). A case that runs past
``--timeout`` seconds is interrupted and counted as an error. It prints
passed / failed / errors / skipped per kind, then every case that passes with
subprocess but not over remowt, grouped by cause (:data:`CAUSES`, else the
exception the case ended with).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("subprocess", "local", "ssh")

# Why a case that passes with subprocess does not pass over remowt (yet), by test method name.
FDS = (
    "the child needs this process's own fds (closed 0-2, pass_fds, close_fds=False): only a local agent takes "
    "them (SCM_RIGHTS); over ssh the child runs where they do not exist"
)
CWD = "the child needs this process's cwd: over ssh it starts in the login's home, where sshd starts a command"
INTERNALS = (
    "tests subprocess's own internals (_execute_child, _fork_exec, _communicate, _wait, _active, waitpid "
    "on the child's pid in this process)"
)
PREEXEC = "preexec_fn runs a function of this process in the child, which the agent forks: refused with ValueError"
CAUSES: Dict[str, str] = {
    **dict.fromkeys(
        [
            "test_close_fds",
            "test_swap_std_fds_with_one_closed",
            "test_pass_fds",
            "test_pass_fds_inheritable",
            "test_pass_fds_redirected",
        ],
        FDS,
    ),
    "test_executable_without_cwd": CWD,
    **dict.fromkeys(
        [
            "test__use_vfork",
            "test_repr",
            "test_failed_child_execute_fd_leak",
            "test_exception_errpipe_bad_data",
            "test_exception_errpipe_normal",
            "test_call_keyboardinterrupt_no_kill",
            "test_context_manager_keyboardinterrupt_no_kill",
            "test_run_keyboardinterrupt_no_kill",
            "test_zombie_fast_process_del",
            "test_leak_fast_process_del_killed",
            "test_send_signal_race",
            "test_stopped",
        ],
        INTERNALS,
    ),
    **dict.fromkeys(
        [
            "test_preexec",
            "test_preexec_exception",
            "test_preexec_errpipe_does_not_double_close_pipes",
            "test_preexec_gc_module_failure",
            "test_close_fds_after_preexec",
            "test_surrogates_error_message",
        ],
        PREEXEC,
    ),
}


class CaseTimeout(BaseException):
    """A case ran past its time (a BaseException, so that the case's own ``except Exception`` lets it through)."""


def _interrupt(signum: int, frame: Any) -> None:
    raise CaseTimeout("the case ran past its time limit")


def _cases(suite: unittest.TestSuite) -> Iterator[unittest.TestCase]:
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _cases(item)
        else:
            yield item


def _outcome(result: unittest.TestResult) -> Tuple[str, str]:
    """How one case ended, and the last line of its first failure."""
    for kind, problems in (("error", result.errors), ("failed", result.failures)):
        if problems:
            lines = problems[0][1].strip().splitlines()
            return kind, lines[-1][:300] if lines else ""
    if result.unexpectedSuccesses:
        return "failed", "unexpected success"
    if result.skipped:
        return "skipped", result.skipped[0][1][:300]
    return "passed", ""


@contextlib.contextmanager
def _connector(kind: str) -> Iterator[Optional[Callable[[], Any]]]:
    """What makes a connection of ``kind`` (None for plain subprocess), with the sshd it needs while in use."""
    import remowt

    if kind == "subprocess":
        yield None
    elif kind == "local":
        yield remowt.connect_local
    else:
        sys.path.insert(0, HERE)
        from sshd import ClientKeys, SshServer

        with tempfile.TemporaryDirectory(prefix="remowt-conformance-") as keys, SshServer(ClientKeys(keys)) as server:
            yield lambda: remowt.connect(server.root_alias, ssh_config=server.ssh_config)


class _Patched:
    """subprocess patched to a connection made by ``connect``; :meth:`renew` replaces a connection a case broke."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        import remowt

        self._connect = connect
        self._patch_type = remowt.patch
        self._open()

    def _open(self) -> None:
        self.conn = self._connect()
        self._patch = self._patch_type(self.conn)
        self._patch.__enter__()

    def close(self) -> None:
        self._patch.__exit__(None, None, None)
        self.conn.close()

    def broken(self) -> bool:
        """True (and a new connection patched in) if the connection no longer answers."""
        try:
            self.conn.ping()
        except Exception:
            self.close()
            self._open()
            return True
        return False


def run_kind(kind: str, timeout: float, select: Optional[str], out: str) -> None:
    """Run the cases with ``kind``'s Popen; write ``{case id: [outcome, detail]}`` as JSON to ``out``."""
    sys.path.insert(0, os.path.dirname(HERE))  # the remowt of this checkout
    results: Dict[str, List[str]] = {}
    with _connector(kind) as connect:
        patched = None if connect is None else _Patched(connect)
        import test.test_subprocess as module  # after the patch: its subclasses of subprocess.Popen are remowt's

        module.setUpModule()
        suite = unittest.defaultTestLoader.loadTestsFromModule(module)
        signal.signal(signal.SIGALRM, _interrupt)
        for case in _cases(suite):
            if select and select not in case.id():
                continue
            result = unittest.TestResult()
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, timeout, 5.0)  # again every 5 s while its clean-up hangs
            try:
                case.run(result)
            except CaseTimeout:
                result.errors.append((case, "CaseTimeout: the case's clean-up ran past its time limit"))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            outcome, detail = _outcome(result)
            if patched is not None and patched.broken():
                outcome, detail = "error", f"the case broke the connection (a new one was made); {detail}"
            results[case.id()] = [outcome, detail]
            print(f"{outcome:8} {time.monotonic() - started:6.1f}s {case.id()}", file=sys.stderr, flush=True)
        if patched is not None:
            patched.close()
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


def _name(case_id: str) -> str:
    return case_id.rsplit(".", 1)[-1]


def report(results: Dict[str, Dict[str, List[str]]]) -> None:
    """Print the counts per kind and the cases that pass with subprocess but not over remowt, by cause."""
    outcomes = ("passed", "failed", "error", "skipped")
    print(f"{'kind':12}" + "".join(f"{o:>9}" for o in outcomes) + f"{'total':>9}")
    for kind, cases in results.items():
        counts = collections.Counter(outcome for outcome, _ in cases.values())
        print(f"{kind:12}" + "".join(f"{counts[o]:9}" for o in outcomes) + f"{len(cases):9}")
    baseline = results.get("subprocess", {})
    groups: Dict[str, Dict[str, List[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for kind, cases in results.items():
        if kind == "subprocess":
            continue
        for case_id, (outcome, detail) in cases.items():
            if outcome in ("failed", "error") and baseline.get(case_id, ["passed"])[0] == "passed":
                cause = CAUSES.get(_name(case_id)) or f"unclassified: {detail}"
                groups[cause][case_id].append(kind)
    for cause in sorted(groups, key=lambda c: (c.startswith("unclassified"), c)):
        print(f"\n{cause}")
        for case_id, kinds in sorted(groups[cause].items()):
            print(f"    {case_id.split('.', 2)[-1]}  [{', '.join(kinds)}]")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, from: " + ", ".join(KINDS))
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take (default 60)")
    parser.add_argument("-k", dest="select", help="only the cases whose id contains this text")
    parser.add_argument("--log", help="the cases' own output, one line per case (default: a temporary file)")
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)  # the child: one kind
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_kind(args.one, args.timeout, args.select, args.out)
        return
    try:
        import test.test_subprocess  # noqa: F401
    except ImportError as e:
        sys.exit(f"CPython's test package is not installed ({e}); on Debian: apt install libpython3.X-testsuite")
    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    log = args.log or tempfile.mkstemp(prefix="remowt-conformance-", suffix=".log")[1]
    results: Dict[str, Dict[str, List[str]]] = {}
    with open(log, "w") as log_file, tempfile.TemporaryDirectory() as scratch:
        for kind in kinds:
            out = os.path.join(scratch, f"{kind}.json")
            command = [sys.executable, os.path.abspath(__file__), "--one", kind, "--timeout", str(args.timeout)]
            if args.select:
                command += ["-k", args.select]
            print(f"running {kind} (log: {log})", file=sys.stderr, flush=True)
            log_file.write(f"=== {kind}\n")
            log_file.flush()
            code = subprocess.run([*command, "--out", out], stdout=log_file, stderr=log_file, cwd=scratch).returncode
            if code or not os.path.exists(out):
                print(f"{kind}: the run stopped with status {code}; see {log}", file=sys.stderr)
                continue
            with open(out) as f:
                results[kind] = json.load(f)
    report(results)


if __name__ == "__main__":
    main()
