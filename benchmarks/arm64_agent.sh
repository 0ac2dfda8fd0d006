#!/usr/bin/env bash
# The light device agent on an arm64 stand-in (issue 28; docs/design.md §14): Debian's qemu-user-static and
# an arm64 Debian root made by debootstrap, the agent installed there with `pip install '.[agent-onnx]'`
# (no torch; ARM64_GGUF=1 adds agent-gguf, which compiles llama.cpp under emulation: an hour or more),
# serving on this machine's loopback; the host measures through it with `edge bench --device`.
# Timings under emulation mean nothing. What it shows: the light install, the engine path and the records'
# device block (machine aarch64, the ARM ISA flags the kernel reports: asimd, asimddp, i8mm, sve...) on ARM.
# qemu-user's default CPU ("max") has every feature, SVE and SME included; /proc/cpuinfo in the root is one
# written from those features (see below), so the records' `cpu` line names no real chip.
#
#   sudo bash benchmarks/arm64_agent.sh          # as root (debootstrap, chroot, binfmt_misc); host venv: .venv
#   ARM64_ROOT=/var/tmp/arm64 EDGE_PY=/path/to/venv/bin/python bash benchmarks/arm64_agent.sh
# Writes benchmarks/results/arm64_agent.json (the records, the device block, the install's timings).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
ROOTFS=${ARM64_ROOT:-/var/tmp/hybrid-edge-arm64}
PY=${EDGE_PY:-$HERE/.venv/bin/python}
PORT=${ARM64_PORT:-8799}
OUT=$HERE/benchmarks/results/arm64_agent.json
WORK=$(mktemp -d)
EXTRAS=agent-onnx
[ "${ARM64_GGUF:-0}" = 1 ] && EXTRAS=agent
started=$(date +%s)
log() { echo "[$(( $(date +%s) - started ))s] $*"; }

command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap; }
# binfmt_misc runs arm64 binaries through qemu (flag F: the interpreter is opened now, so it works in the chroot)
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
registered=0
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    registered=1
fi

agent=
cleanup() {
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
    umount "$ROOTFS/proc/cpuinfo" 2>/dev/null || true
    for m in proc dev sys; do umount "$ROOTFS/$m" 2>/dev/null || true; done
    [ "$registered" = 1 ] && echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    log "debootstrap: arm64 Debian bookworm into $ROOTFS"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$ROOTFS" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log"; exit 1; }
fi
t_root=$(( $(date +%s) - started ))
for m in proc dev sys; do mountpoint -q "$ROOTFS/$m" || mount --bind "/$m" "$ROOTFS/$m"; done
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"

log "the project's source into the root, then: pip install '.[$EXTRAS]' (emulated arm64)"
rm -rf "$ROOTFS/opt/hybrid-edge" && mkdir -p "$ROOTFS/opt/hybrid-edge"
git -C "$HERE" ls-files -z | (cd "$HERE" && xargs -0 tar -cf - --) | tar -xf - -C "$ROOTFS/opt/hybrid-edge"
# qemu-user shows this host's /proc/cpuinfo (x86) to the arm64 process, and ARM code that parses it
# (onnxruntime's cpuinfo) crashes on import (SIGSEGV): show it an arm64 one, written from the features the
# emulated CPU reports (HWCAP, device/probe.py), one entry per CPU of /sys
features=$(chroot "$ROOTFS" /usr/bin/env PYTHONPATH=/opt/hybrid-edge /usr/bin/python3 -c \
    "from device.probe import arm_features; print(' '.join(['fp', *arm_features(), 'cpuid']))")
for i in $(seq 0 $(( $(nproc --all) - 1 ))); do
    printf 'processor\t: %s\nBogoMIPS\t: 100.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\n' "$i" "$features"
    printf 'CPU variant\t: 0x0\nCPU part\t: 0xd0c\nCPU revision\t: 0\n\n'
done > "$WORK/cpuinfo"
mount --bind "$WORK/cpuinfo" "$ROOTFS/proc/cpuinfo"
chroot "$ROOTFS" /bin/sh -c "[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv"
# the root trusts the host's CA bundle (a proxy's CA, where pip here goes through one: Debian's pip reads
# the system bundle whatever --cert says); this host's local wheel links mean nothing there
cp "${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
chroot "$ROOTFS" /usr/bin/env -u PIP_FIND_LINKS -u PIP_CERT \
    /opt/venv/bin/pip install --quiet --disable-pip-version-check "/opt/hybrid-edge[$EXTRAS]"
t_install=$(( $(date +%s) - started - t_root ))
chroot "$ROOTFS" /opt/venv/bin/python -c \
    "import importlib.util as u, platform; print(platform.machine(), 'torch' if u.find_spec('torch') else 'no torch')" \
    | tee "$WORK/machine"
grep -q "^aarch64 no torch$" "$WORK/machine"

log "agent on 127.0.0.1:$PORT inside the arm64 root"
"$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$ROOTFS/opt/token"
chmod 600 "$ROOTFS/opt/token"
rm -rf "$ROOTFS/opt/cache"
chroot "$ROOTFS" /opt/venv/bin/edge device serve --token-file /opt/token --port "$PORT" --cache /opt/cache \
    --name arm64-qemu --max-deadline-s 3600 > "$WORK/agent.log" 2>&1 &
agent=$!
for _ in $(seq 300); do
    grep -q "edge device agent on" "$WORK/agent.log" 2>/dev/null && break
    kill -0 "$agent" 2>/dev/null || { cat "$WORK/agent.log"; exit 1; }
    sleep 1
done
sleep 2

log "host: export the tiny model, edge bench --device"
cd "$WORK"
"$PY" -m edge.cli init model > /dev/null
artifacts=(model.onnx)
"$PY" -m edge.cli export onnx model -o model.onnx > /dev/null
if [ "$EXTRAS" = agent ]; then "$PY" -m edge.cli export gguf model -o model.gguf > /dev/null; artifacts+=(model.gguf); fi
"$PY" -m edge.cli bench "${artifacts[@]}" -p 32 -n 16 -r 2 -t 1 --device "http://127.0.0.1:$PORT" \
    --device-token-file "$ROOTFS/opt/token" --json records.json

"$PY" - "$OUT" "$t_root" "$t_install" "$EXTRAS" <<'EOF'
import json, sys, time
out, t_root, t_install, extras = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
records = json.load(open("records.json"))
device = records[0]["device"]
assert device["machine"] == "aarch64", device["machine"]
record = {"date": time.strftime("%Y-%m-%d"), "what": "the light agent (pip install '.[%s]') on emulated arm64 "
          "(qemu-user-static, Debian bookworm root by debootstrap), measured from the x86-64 host over loopback; "
          "timings under emulation mean nothing" % extras,
          "root_s": t_root, "install_s": t_install, "device": device,
          "records": [{k: r[k] for k in ("model_filename", "test", "engine", "median_ts", "cpu")} for r in records]}
json.dump(record, open(out, "w"), indent=1)
print(f"wrote {out}: machine {device['machine']}, isa {device['isa']}, engines {device['engines']}")
EOF
log "done"
