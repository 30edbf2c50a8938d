"""Fixtures for the network-namespace end-to-end tests.

One lab (two namespaces joined by a veth pair, one dataplane worker in each; see docs/lab.md)
is shared by the whole session because building it costs a few seconds; every test installs
its own freshly keyed SAs and SPD and the fixture removes them afterwards. If a worker dies,
the test that saw it fails with the worker's log and the next test gets a new lab. The lab's
context manager deletes its namespaces at the end of the session (and on Ctrl-C); namespaces
left by a killed run are swept when the next lab is built.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
from collections.abc import Iterator

import pytest

from services.dataplane.lab import Lab, lab, netns_supported

REQUIRED_TOOLS = ("ping", "tcpdump", "tshark")


def skip_reason() -> str | None:
    """Why the netns tests cannot run here, or None."""
    ok, why = netns_supported()
    if not ok:
        return f"netns tests skipped: {why}"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return f"netns tests skipped: {', '.join(missing)} not installed (`make setup` installs)"
    return None


class LabHolder:
    """Keeps one lab open across tests and rebuilds it when a worker has died."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None
        self.lab: Lab | None = None
        self.builds = 0
        atexit.register(self.close)

    def get(self) -> Lab:
        current = self.lab
        if current is not None and all(n.worker_alive() for n in current.nodes):
            return current
        self.close()
        stack = contextlib.ExitStack()
        try:
            self.lab = stack.enter_context(lab())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self.builds += 1
        return self.lab

    def close(self) -> None:
        stack, self._stack, self.lab = self._stack, None, None
        if stack is not None:
            stack.close()


@pytest.fixture(scope="session")
def lab_holder() -> Iterator[LabHolder]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    holder = LabHolder()
    try:
        yield holder
    finally:
        holder.close()


@pytest.fixture
def netns_lab(lab_holder: LabHolder) -> Iterator[Lab]:
    """The shared lab with no SAs installed; SAs a test installs are removed afterwards."""
    lb = lab_holder.get()
    yield lb
    dead = [n for n in lb.nodes if not n.worker_alive()]
    if dead:
        logs = "\n".join(f"--- {n.worker_id} log ---\n{n.worker_log(60)}" for n in dead)
        lab_holder.close()
        pytest.fail(f"worker(s) died during the test: {[n.worker_id for n in dead]}\n{logs}")
    lb.clear_sas()
