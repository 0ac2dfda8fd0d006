"""Where a measurement runs: one interface, two transports (docs/design.md §4 "Deployment targets").

- `LocalTransport`: this machine. A search candidate is timed in a child process with a time limit
  (`runtime.isolate`'s runner, `runtime.bench`'s timer); `edge bench` runs in-process as always.
- `device.client.DeviceTransport`: a device agent (`edge device serve`) over HTTP; the agent itself
  measures with a LocalTransport on the device, so both paths time with the same code.

Both return the same things: for a candidate, the `arch_search.measure.child_bench` result (plus a
`device` block); for `edge bench`, the records `edge bench --json` writes (plus `device`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.isolate import RECORDS, REQUEST, RESULT, SETTINGS, child_main, run_child


class Transport:
    label = "?"

    def measure_candidate(self, artifact: Path, settings) -> dict:
        """Time an exported candidate (`artifact` is WORKDIR/model.<suffix>) with MeasureSettings `settings`;
        raises runtime.isolate.MeasureFailed with a one-line reason."""
        raise NotImplementedError

    def bench(self, artifacts: list[Path], **options) -> list[dict]:
        """`edge bench` records of `artifacts` (options as runtime.bench.bench_artifacts takes them)."""
        raise NotImplementedError

    def check(self, suffix: str) -> None:
        """Before a search: raise EdgeError (one line) if this transport cannot measure `suffix` files."""

    def wait_until_reachable(self, timeout_s: float) -> bool:
        return True

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    label = "local"

    def measure_candidate(self, artifact: Path, settings) -> dict:
        return self.time_candidate(Path(artifact).parent, settings.to_dict(), settings.timeout_s)

    @staticmethod
    def time_candidate(workdir: Path, settings: dict, timeout_s: float, **limits) -> dict:
        """Time WORKDIR/model.<suffix> with the protocol `settings` (MeasureSettings.to_dict()) in a child
        working in WORKDIR (limits: run_child's cancel, cpus, memory_bytes)."""
        (workdir / SETTINGS).write_text(json.dumps(settings))
        # the search's timing child, started by its module name: a process boundary, not an import
        run_child("arch_search.measure", ["bench", "."], timeout_s, "bench", cwd=workdir, **limits)
        return json.loads((workdir / RESULT).read_text())

    def bench(self, artifacts, **options) -> list[dict]:
        from runtime.bench import bench_artifacts

        return bench_artifacts(artifacts, **options)

    @staticmethod
    def bench_isolated(workdir: Path, timeout_s: float, **limits) -> list[dict]:
        """`bench` in a child process working in WORKDIR, with a time limit (limits: run_child's): its
        request file names the files (relative) and options, the child writes the records file (what the
        agent runs for `edge bench --device`)."""
        run_child("device.transport", ["records", "."], timeout_s, "bench", cwd=workdir, **limits)
        return json.loads((workdir / RECORDS).read_text())


def main(argv=None) -> int:
    """`python -m device.transport records WORKDIR`: the child side of LocalTransport.bench_isolated."""
    from edge.files import write_json

    step, workdir = (argv or sys.argv[1:])[:2]
    workdir = Path(workdir)

    def records():
        request = json.loads((workdir / REQUEST).read_text())
        found = LocalTransport().bench([workdir / name for name in request["files"]], progress=False,
                                       **request["options"])
        write_json(workdir / RECORDS, found)

    return child_main(records)


def transports(urls: list[str] | None, token_file: str | None = None, **client_options) -> list[Transport]:
    """The transports a command measures through: one per --device URL, else this machine."""
    if not urls:
        return [LocalTransport()]
    from .client import DeviceTransport, read_token

    token = read_token(token_file)
    return [DeviceTransport(url, token, **client_options) for url in urls]


if __name__ == "__main__":
    sys.exit(main())
