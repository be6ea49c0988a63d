"""A command builder: ``conn.cmd("systemctl").arg("show").eqarg("--property", "X").run_string()``."""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any, Iterable, Optional, Tuple, Type, TypeVar

import msgspec

from ..protocol import wire
from .popen import PIPE, CalledProcessError, CompletedProcess, Popen, run

if TYPE_CHECKING:
    from .node import Node

T = TypeVar("T")


class Command:
    """An immutable command line: each method returns a new, extended command."""

    def __init__(
        self,
        connection: Node,
        program: str,
        arguments: Tuple[str, ...] = (),
        environment: Tuple[Tuple[str, str], ...] = (),
        directory: Optional[str] = None,
    ) -> None:
        if not program:
            raise ValueError("the program name must not be empty")
        self.connection = connection
        self.program = str(program)
        self.arguments = arguments
        self.environment = environment
        self.directory = directory

    def _with(self, **changes: Any) -> Command:
        values: dict[str, Any] = {
            "arguments": self.arguments,
            "environment": self.environment,
            "directory": self.directory,
        }
        values.update(changes)
        return Command(self.connection, self.program, **values)

    def arg(self, value: Any) -> Command:
        """Append one argument."""
        return self._with(arguments=(*self.arguments, str(value)))

    def args(self, values: Iterable[Any]) -> Command:
        """Append several arguments."""
        return self._with(arguments=(*self.arguments, *(str(v) for v in values)))

    def eqarg(self, key: str, value: Any) -> Command:
        """Append ``key=value`` as one argument (``--property=X``)."""
        return self.arg(f"{key}={value}")

    def comparg(self, key: str, value: Any) -> Command:
        """Append ``key`` and ``value`` as two arguments (``-p X``)."""
        return self.args((key, value))

    def env(self, name: str, value: Any) -> Command:
        """Set an environment variable for the command (on top of the agent's environment)."""
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"invalid environment variable name {name!r}")
        return self._with(environment=(*self.environment, (name, str(value))))

    def cwd(self, path: Any) -> Command:
        """Run the command in ``path``."""
        return self._with(directory=str(path))

    def sudo(self) -> Command:
        """Run the command as root, through the connection's privileged agent (``conn.privileged``)."""
        return Command(self.connection.privileged, self.program, self.arguments, self.environment, self.directory)

    @property
    def privileged(self) -> bool:
        """Whether the command runs through the privileged agent (:meth:`sudo`)."""
        return self.connection.address == wire.AGENT_PRIVILEGED

    @property
    def argv(self) -> list[str]:
        return [self.program, *self.arguments]

    def __str__(self) -> str:
        """A correctly quoted shell line that does the same, for display and logs."""
        parts = []
        if self.directory is not None:
            parts.append(f"cd {shlex.quote(self.directory)} &&")
        if self.privileged:
            parts.append("sudo")
        if self.environment:
            parts.append("env")
            parts.extend(shlex.quote(f"{k}={v}") for k, v in self.environment)
        if self.environment or self.privileged:
            if "=" in self.program:
                # env and sudo would take the program for one more NAME=VALUE: let a shell start it instead
                parts.extend(["sh", "-c", shlex.quote('exec "$0" "$@"')])
            parts.append(shlex.quote(self.program))
        else:
            parts.append(_quote_program(self.program))
        parts.extend(shlex.quote(a) for a in self.arguments)
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"<Command {self}>"

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"connection": self.connection, "cwd": self.directory}
        if self.environment:
            kwargs["extra_env"] = dict(self.environment)
        return kwargs

    def popen(self, **kwargs: Any) -> Popen:
        """Start the command with :class:`remowt.Popen` (keyword arguments as for Popen)."""
        return Popen(self.argv, **self._popen_kwargs(), **kwargs)

    def run(self, *, input: Optional[bytes] = None, timeout: Optional[float] = None) -> CompletedProcess[bytes]:
        """Run to completion with output captured; :class:`CalledProcessError` (with stderr) if it fails."""
        result = run(self.argv, input=input, stdout=PIPE, stderr=PIPE, timeout=timeout, **self._popen_kwargs())
        if result.returncode:
            raise CalledProcessError(result.returncode, str(self), output=result.stdout, stderr=result.stderr)
        return result

    def run_string(self, *, input: Optional[bytes] = None, timeout: Optional[float] = None) -> str:
        """Run and return stdout as text (UTF-8)."""
        return self.run(input=input, timeout=timeout).stdout.decode("utf-8")

    def run_value(self, type: Type[T], *, input: Optional[bytes] = None, timeout: Optional[float] = None) -> T:
        """Run, decode stdout as JSON and validate it into ``type`` (msgspec)."""
        stdout = self.run(input=input, timeout=timeout).stdout
        try:
            return msgspec.json.decode(stdout, type=type)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            raise ValueError(f"output of {self} is not a valid {type!r}: {e}") from None
        except RecursionError:
            raise ValueError(f"output of {self} is nested too deeply to decode") from None


def _quote_program(program: str) -> str:
    """The program's word in a shell line: quoted if it has a '=', or the shell may read an assignment."""
    quoted = shlex.quote(program)
    return f"'{program}'" if "=" in program and quoted == program else quoted
