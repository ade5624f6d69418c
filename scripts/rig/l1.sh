#!/usr/bin/env bash
# Runs a shell script inside an "L1" VM: QEMU in software mode (TCG) emulating an AMD CPU with SVM,
# booting Debian's cloud kernel with an initramfs built here, in which the kvm-amd module gives a
# hardware-style /dev/kvm. That is where kata-snap can boot Linux guests at speed on a host whose
# own KVM only emulates guest code (the nested paravirtual kvm_pvm). See README, "Rung 4".
#
# Usage: scripts/rig/l1.sh [options] SCRIPT [ARG...]
#   --file SRC[=DEST]   copy SRC into the L1 filesystem at DEST (default: the same absolute path)
#   --bin SRC[=DEST]    as --file, plus the shared libraries and loader `ldd SRC` names
#   --dir SRC[=DEST]    copy the directory tree SRC (symbolic links kept) to DEST (default: the same)
#   --env NAME=VALUE    environment for SCRIPT (repeatable)
#   --timeout SECS      whole-run bound, QEMU start to exit (default 600); SCRIPT gets 30 s less
#   --mem MIB           L1 memory (default 4096)
#   --smp N             L1 vCPUs (default 1: with 2, QEMU 7.2's TCG broke nested SVM
#                       under load: L1 kernel panics, L2 triple faults and stalls; see README)
#   --cpu MODEL         QEMU CPU model (default EPYC-v3,+svm,+npt)
#   --accel ACCEL       QEMU accelerator (default tcg; tcg,thread=single: one host thread)
#   --kvm-amd PARAMS    module parameters for kvm-amd.ko (e.g. "vgif=0 avic=0")
#   --log FILE          keep the L1 console log there (default: a temp file, printed at the end)
#   --quiet             do not copy the console to stdout while it runs
#   (env RIG_STALL=SECS: stop a run whose console has been silent that long, default 180)
#
# SCRIPT runs as root under busybox sh in L1, in /rig, with /dev/kvm present, /tmp a tmpfs, and
# the busybox applets, /sbin/{mke2fs,mkfs.ext4,e2fsck,debugfs} on PATH. Its exit status becomes
# this command's: the last console line of the run is `RIG-VERDICT exit=N`. If L1 never gets there
# (QEMU timed out, L1 crashed, /dev/kvm missing), this exits 125 with the reason on stderr.
# Needs qemu-system-x86 (7.2 tested), busybox-static, cpio, e2fsprogs, and the cloud kernel with its
# KVM modules from scripts/fetch-linux-kernel.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${KATA_SNAP_CACHE:-$HOME/.cache/kata-snap}"

files=() bins=() envs=() dirs=()
timeout=600 mem=4096 smp=1 cpu="EPYC-v3,+svm,+npt" log="" quiet=0 kvm_amd="" accel=tcg
while [ $# -gt 0 ]; do
    case "$1" in
        --file) files+=("$2"); shift 2 ;;
        --bin) bins+=("$2"); shift 2 ;;
        --dir) dirs+=("$2"); shift 2 ;;
        --env) envs+=("$2"); shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --mem) mem="$2"; shift 2 ;;
        --smp) smp="$2"; shift 2 ;;
        --cpu) cpu="$2"; shift 2 ;;
        --kvm-amd) kvm_amd="$2"; shift 2 ;;
        --accel) accel="$2"; shift 2 ;;
        --log) log="$2"; shift 2 ;;
        --quiet) quiet=1; shift ;;
        --) shift; break ;;
        -*) echo "l1.sh: unknown option $1" >&2; exit 125 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { sed -n '2,/^set -e/p' "$0" | sed 's/^# \{0,1\}//;$d' >&2; exit 125; }
script="$1"; shift
[ -f "$script" ] || { echo "l1.sh: no script $script" >&2; exit 125; }

fail() { echo "l1.sh: $*" >&2; exit 125; }
command -v qemu-system-x86_64 >/dev/null || fail "qemu-system-x86_64 missing (apt-get install qemu-system-x86; scripts/install-deps.sh)"
[ -x /bin/busybox ] || fail "/bin/busybox missing (apt-get install busybox-static)"
kernel="$cache/linux/vmlinuz"
modules="$cache/linux/modules"
[ -s "$kernel" ] && [ -s "$modules/load-order" ] || "$root/scripts/fetch-linux-kernel.sh" >/dev/null
[ -s "$kernel" ] && [ -s "$modules/load-order" ] || fail "no L1 kernel/modules in $cache/linux"

work="$(mktemp -d "${TMPDIR:-/tmp}/kata-snap-l1.XXXXXX")"
trap 'rm -rf "$work"' EXIT
stage="$work/root"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,rig/modules,etc,root,lib64}

# DEST is SRC's absolute path unless given.
put() { # put SRC DEST
    local src="$1" dest="$2"
    [ -e "$src" ] || fail "no such file: $src"
    mkdir -p "$stage$(dirname "$dest")"
    cp -L "$src" "$stage$dest"
}
split() { # split SPEC -> SRC DEST
    local spec="$1" src dest
    src="${spec%%=*}"
    if [ "$src" = "$spec" ]; then dest="$(realpath "$src")"; else dest="${spec#*=}"; fi
    echo "$src" "$dest"
}
libs_of() { # the libraries and loader ldd names for a dynamic binary (nothing for a static one)
    ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' || true
}
add_bin() { # add_bin SRC DEST
    put "$1" "$2"
    local l
    for l in $(libs_of "$1"); do
        [ -e "$stage$l" ] || put "$l" "$l"
    done
}

cp /bin/busybox "$stage/bin/busybox"
for b in /sbin/mke2fs /sbin/e2fsck /sbin/debugfs; do
    [ -x "$b" ] && add_bin "$b" "$b"
done
ln -sf mke2fs "$stage/sbin/mkfs.ext4"
for m in $(cat "$modules/load-order"); do
    cp "$modules/$m" "$stage/rig/modules/$m"
done
cp "$modules/load-order" "$stage/rig/modules/load-order"
for f in "${files[@]+"${files[@]}"}"; do
    read -r src dest < <(split "$f")
    put "$src" "$dest"
done
for f in "${bins[@]+"${bins[@]}"}"; do
    read -r src dest < <(split "$f")
    add_bin "$src" "$dest"
done
for f in "${dirs[@]+"${dirs[@]}"}"; do
    read -r src dest < <(split "$f")
    [ -d "$src" ] || fail "no such directory: $src"
    mkdir -p "$stage$dest"
    cp -a "$src/." "$stage$dest/"
done
cp "$script" "$stage/rig/script.sh"
{
    for e in "${envs[@]+"${envs[@]}"}"; do printf 'export %q\n' "$e"; done
    printf 'set --'; for a in "$@"; do printf ' %q' "$a"; done; echo
} > "$stage/rig/env"
echo "root:x:0:0:root:/root:/bin/sh" > "$stage/etc/passwd"
echo "root:x:0:" > "$stage/etc/group"

script_timeout=$((timeout > 60 ? timeout - 30 : timeout / 2))
cat > "$stage/init" <<INIT
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts
# Files packed under /tmp (a checkout or build there, as CI's may be) move into the tmpfs that
# is mounted over it, instead of being hidden by it.
mkdir -p /.rig-tmp && cp -a /tmp/. /.rig-tmp/
mount -t tmpfs -o size=75% tmpfs /tmp
cp -a /.rig-tmp/. /tmp/ && rm -rf /.rig-tmp
mount -t tmpfs tmpfs /run
# runc wants the cgroup2 hierarchy (the runtime tests compare kata-snap with it).
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
verdict() { echo "RIG-VERDICT exit=\$1"; sync; reboot -f; sleep 5; echo o > /proc/sysrq-trigger; }
echo "RIG: L1 up after \$(cut -d' ' -f1 /proc/uptime) s"
for m in \$(cat /rig/modules/load-order); do
    params=""; [ "\$m" = kvm-amd.ko ] && params="$kvm_amd"
    insmod /rig/modules/\$m \$params || { echo "RIG-ERROR: insmod \$m failed"; verdict 125; }
done
[ -c /dev/kvm ] || { echo "RIG-ERROR: no /dev/kvm after loading kvm-amd"; dmesg | tail -n 20; verdict 125; }
# Loopback up, as on any host (Docker's published ports are reached at 127.0.0.1).
ip link set lo up
echo "RIG: /dev/kvm ready after \$(cut -d' ' -f1 /proc/uptime) s"
cd /rig
# A heartbeat on the console: a test that waits silently keeps L1 talking, so the host's
# watchdog (RIG_STALL) only stops an L1 that froze itself.
(while sleep 30; do echo "RIG-ALIVE \$(cut -d' ' -f1 /proc/uptime)"; done) &
. /rig/env
timeout $script_timeout sh /rig/script.sh "\$@"
rc=\$?
[ \$rc -eq 143 ] && echo "RIG-ERROR: the script did not finish within $script_timeout s"
verdict \$rc
INIT
chmod +x "$stage/init" "$stage/bin/busybox"

(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$work/l1.cpio"

[ -n "$log" ] || log="$(mktemp "${TMPDIR:-/tmp}/kata-snap-l1-log.XXXXXX")"
: > "$log"
echo "l1.sh: L1 initramfs $(( $(stat -c %s "$work/l1.cpio") / 1048576 )) MiB; console log: $log" >&2
# A frozen emulator (seen under load with nested SVM in TCG: L1 goes idle and never reaches its
# verdict) is stopped once the console has been silent for RIG_STALL seconds (default 180; L1
# prints a heartbeat every 30 s while it runs), instead of at the end of --timeout.
stall="${RIG_STALL:-180}"
watchdog() {
    local last=-1 quiet_for=0 size
    while sleep 10; do
        size=$(stat -c %s "$log" 2>/dev/null || echo 0)
        if [ "$size" != "$last" ]; then
            last=$size quiet_for=0
        else
            quiet_for=$((quiet_for + 10))
        fi
        if [ "$quiet_for" -ge "$stall" ]; then
            echo "l1.sh: no console output for $stall s: the emulator froze; stopping it" >&2
            : > "$work/stalled"
            pkill -f -- "$work/l1.cpio" || true
            return
        fi
    done
}
watchdog &
watchdog_pid=$!
start=$(date +%s.%N)
set +e
if [ "$quiet" = 1 ]; then
    timeout -k 5 "$timeout" qemu-system-x86_64 -machine pc -accel "$accel" -cpu "$cpu" -smp "$smp" \
        -m "$mem" -nographic -nic none -no-reboot -kernel "$kernel" -initrd "$work/l1.cpio" \
        -append "console=ttyS0 panic=-1 quiet ${L1_APPEND:-}" </dev/null >"$log" 2>&1
    qstatus=$?
else
    timeout -k 5 "$timeout" qemu-system-x86_64 -machine pc -accel "$accel" -cpu "$cpu" -smp "$smp" \
        -m "$mem" -nographic -nic none -no-reboot -kernel "$kernel" -initrd "$work/l1.cpio" \
        -append "console=ttyS0 panic=-1 quiet ${L1_APPEND:-}" </dev/null 2>&1 | tee "$log"
    qstatus=${PIPESTATUS[0]}
fi
kill "$watchdog_pid" 2>/dev/null
wait "$watchdog_pid" 2>/dev/null
set -e
end=$(date +%s.%N)
secs=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}')
verdict=$(tr -d '\r' < "$log" | sed -n 's/^RIG-VERDICT exit=\([0-9]*\)$/\1/p' | tail -n 1)
if [ -z "$verdict" ]; then
    if [ -e "$work/stalled" ]; then
        echo "l1.sh: L1 froze (no console output for $stall s, no verdict); log: $log" >&2
    elif [ "$qstatus" = 124 ]; then
        echo "l1.sh: QEMU did not finish within $timeout s (no verdict); log: $log" >&2
    else
        echo "l1.sh: L1 ended without a verdict (QEMU status $qstatus); log: $log" >&2
    fi
    tail -n 20 "$log" >&2
    exit 125
fi
echo "l1.sh: verdict exit=$verdict after ${secs} s (QEMU start to exit, emulated); log: $log" | tee -a "$log" >&2
exit "$verdict"
