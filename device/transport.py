"""Where a measurement runs: one interface, two transports (docs/design.md §4 "Deployment targets").

- `LocalTransport`: this machine. A search candidate is timed in a child process with a time limit
  (`arch_search.measure`'s isolation, `runtime.bench`'s timer); `edge bench` runs in-process as always.
- `device.client.DeviceTransport`: a device agent (`edge device serve`) over HTTP; the agent itself
  measures with a LocalTransport on the device, so both paths time with the same code.

Both return the same things: for a candidate, the `arch_search.measure.child_bench` result (plus a
`device` block); for `edge bench`, the records `edge bench --json` writes (plus `device`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


class Transport:
    label = "?"

    def measure_candidate(self, artifact: Path, settings) -> dict:
        """Time an exported candidate (`artifact` is WORKDIR/model.<suffix>) with MeasureSettings `settings`;
        raises arch_search.measure.MeasureFailed with a one-line reason."""
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
        from arch_search.measure import _run_child

        workdir = Path(artifact).parent
        (workdir / "settings.json").write_text(json.dumps(settings.to_dict()))
        _run_child(["bench", str(workdir)], settings.timeout_s, "bench")
        return json.loads((workdir / "result.json").read_text())

    def bench(self, artifacts, **options) -> list[dict]:
        from runtime.bench import bench_artifacts

        return bench_artifacts(artifacts, **options)

    def bench_isolated(self, workdir: Path, timeout_s: float) -> list[dict]:
        """`bench` in a child process with a time limit: WORKDIR/request.json names the files and options,
        the child writes WORKDIR/records.json (what the agent runs for `edge bench --device`)."""
        from arch_search.measure import _run_child

        _run_child(["records", str(workdir)], timeout_s, "bench", module="device.transport")
        return json.loads((workdir / "records.json").read_text())


def main(argv=None) -> int:
    """`python -m device.transport records WORKDIR`: the child side of LocalTransport.bench_isolated."""
    from arch_search.measure import _die_with_parent
    from edge.files import write_json

    step, workdir = (argv or sys.argv[1:])[:2]
    workdir = Path(workdir)
    _die_with_parent()
    try:
        request = json.loads((workdir / "request.json").read_text())
        records = LocalTransport().bench([workdir / name for name in request["files"]], progress=False,
                                         **request["options"])
        write_json(workdir / "records.json", records)
    except Exception as e:  # noqa: BLE001 - the parent reads the last line as the reason
        print(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", file=sys.stderr)
        return 1
    return 0


def transports(urls: list[str] | None, token_file: str | None = None, **client_options) -> list[Transport]:
    """The transports a command measures through: one per --device URL, else this machine."""
    if not urls:
        return [LocalTransport()]
    from .client import DeviceTransport, read_token

    token = read_token(token_file)
    return [DeviceTransport(url, token, **client_options) for url in urls]


if __name__ == "__main__":
    sys.exit(main())
