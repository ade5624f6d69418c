# Runs inside the L1 VM (scripts/rig/l1.sh, started by scripts/rig/runc-bats.sh), under busybox sh:
# runc's own integration suite (bats) with RUNC pointing at one runtime, one bats run per file so
# that every TAP line can be tagged with its file. Each TAP line goes to the console as
#   RB|RUNTIME|FILE|LINE
# and the host script sorts them out. Environment (from runc-bats.sh):
#   RB_RUNTIME   runc | kata-snap       RB_REAL   the runtime's binary in L1
#   RB_FILES     the .bats files to run (names in tests/integration)
#   RB_TEST_TIMEOUT  bound on each test (BATS_TEST_TIMEOUT), RB_FILE_TIMEOUT on each file
# busybox sh (built to prefer its applets to PATH) hands over to bash, so GNU tools come first.
[ -n "${BASH_VERSION:-}" ] || exec /rig/tools/bin/bash "$0" "$@"
suite=/rig/runc-src/tests/integration
export PATH=/rig/tools/bin:/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root TMPDIR=/tmp LANG=C.UTF-8
# GNU tools first; bash also where scripts look for it.
[ -e /bin/bash ] || ln -s /rig/tools/bin/bash /bin/bash
[ -e /usr/bin/awk ] || ln -s /rig/tools/bin/awk /usr/bin/awk
[ -e /usr/bin/env ] || ln -s /rig/tools/bin/env /usr/bin/env   # bats's #!/usr/bin/env bash
# What udev would make: bash's process substitution needs /dev/fd.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
for i in 0:stdin 1:stdout 2:stderr; do [ -e /dev/${i#*:} ] || ln -s /proc/self/fd/${i%%:*} /dev/${i#*:}; done
mkdir -p /var/lib /var/run /run/runc /dev/shm /dev/mqueue
mount -t tmpfs shm /dev/shm 2>/dev/null
mount -t mqueue mqueue /dev/mqueue 2>/dev/null
# The cgroup v2 controllers for the tests' containers (runc enables them per level below the root).
for c in $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null); do
    echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
done

# Both runtimes are run through the same wrapper named `runc`: L1's root is an initramfs, where
# pivot_root fails, so `run` and `create` get `--no-pivot` (unless the test passes it itself).
mkdir -p /rig/rt
cat > /rig/rt/runc <<EOF
#!/rig/tools/bin/bash
real=$RB_REAL
EOF
cat >> /rig/rt/runc <<'EOF'
args=()
while [ $# -gt 0 ]; do
    a="$1"; shift
    case "$a" in
        --root|--log|--log-format|--criu|--rootless) args+=("$a"); [ $# -gt 0 ] && { args+=("$1"); shift; } ;;
        -*) args+=("$a") ;;
        run|create)
            args+=("$a")
            case " $* " in *" --no-pivot "*) ;; *) args+=(--no-pivot) ;; esac
            args+=("$@"); break ;;
        *) args+=("$a" "$@"); break ;;
    esac
done
exec -a "$0" "$real" "${args[@]}"
EOF
chmod +x /rig/rt/runc
cat > /rig/rt/leftovers <<'EOF'
#!/rig/tools/bin/bash
# Kills the processes other than this one that hold this terminal open (runc-bats).
tty=$(readlink /proc/$$/fd/1)
for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [ "$p" = $$ ] || [ "$p" = "$PPID" ] && continue
    for fd in "$d"/fd/*; do
        if [ "$(readlink "$fd" 2>/dev/null)" = "$tty" ]; then
            echo "# left running after the file: $(tr '\0' ' ' < "$d/cmdline" 2>/dev/null | cut -c1-150)"
            kill -9 "$p" 2>/dev/null
            break
        fi
    done
done
exit 0
EOF
chmod +x /rig/rt/leftovers
# The processes holding a pipe that a running bats holds (its fd 3, its formatter's input):
# bats waits for all of them to close it before it ends.
cat > /rig/rt/fd3-holders <<'EOF'
#!/bin/bash
# The pipes the bats processes hold (bats waits for their other ends to close)...
declare -A pipes
for b in $(pgrep -f 'bats-exec-|/bin/bats|libexec/bats' 2>/dev/null); do
    for fd in /proc/"$b"/fd/*; do
        l="$(readlink "$fd" 2>/dev/null)"
        case "$l" in pipe:*) pipes[$l]=1 ;; esac
    done
done
# ... and who else holds one of them, bats and its shells aside.
for d in /proc/[0-9]*; do
    p="${d#/proc/}"
    [ "$p" = "$$" ] && continue
    comm="$(cat "$d/comm" 2>/dev/null)"
    args="$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null | cut -c1-200)"
    case "$comm $args" in bash*bats*|bats*|"sed "*|"script "*|"timeout "*|"sleep "*|fd3-holders*) continue ;; esac
    for fd in "$d"/fd/*; do
        l="$(readlink "$fd" 2>/dev/null)"
        if [ -n "$l" ] && [ -n "${pipes[$l]:-}" ]; then
            echo "RB|$1|$2|# holds a pipe of bats ($l as fd ${fd##*/}): pid $p ppid $(awk '{print $4}' "$d/stat" 2>/dev/null) comm $comm: $args"
            break
        fi
    done
done
exit 0
EOF
chmod +x /rig/rt/fd3-holders
export RUNC=/rig/rt/runc
# kata-snap's guest, named in its config file as an installation would (the rung-4 artefacts).
if [ -n "${KATA_SNAP_GUEST_KERNEL:-}" ]; then
    mkdir -p /etc/kata-snap
    printf '{"kernel": "%s", "initramfs": "%s"}\n' "$KATA_SNAP_GUEST_KERNEL" "$KATA_SNAP_GUEST_INITRAMFS" > /etc/kata-snap/config.json
fi
[ -n "$RB_TEST_TIMEOUT" ] && export BATS_TEST_TIMEOUT="$RB_TEST_TIMEOUT"

echo "RIG: runc-bats: runtime $RB_RUNTIME ($("$RUNC" --version 2>&1 | head -n 1)), kernel $(uname -r), cgroup controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null)"
start=$(cut -d' ' -f1 /proc/uptime)
cd "$suite" || exit 125
for f in $RB_FILES; do
    [ -f "$f" ] || { echo "RB|$RB_RUNTIME|$f|# no such file"; continue; }
    t0=$(cut -d' ' -f1 /proc/uptime)
    echo "RB|$RB_RUNTIME|$f|# begin"
    # Under a terminal of its own (script(1)'s pty, the controlling terminal), as runc's CI runs
    # the suite: a foreground `runc run` with terminal: true needs one.
    # script(1) reads its terminal until every process holding it has closed it: whatever a file
    # left running with the terminal open (a container whose delete failed, a helper) is named
    # and killed after bats. bats itself waits for every holder of its fd 3: a detached runtime
    # process that inherited it (kata-snap at cf9576d) keeps the file from ending until
    # RB_FILE_TIMEOUT; the results printed before stay.
    # Who keeps bats waiting: every RB_HOLDERS_EVERY s (default 120), the processes other than
    # bats and its shells that hold a pipe bats holds (after update.bats: the recvtty its test
    # 13 starts and kills only when kata-snap runs the container, which it refuses).
    ( while sleep "${RB_HOLDERS_EVERY:-120}"; do /rig/rt/fd3-holders "$RB_RUNTIME" "$f"; done ) &
    holders=$!
    timeout -k 10 "${RB_FILE_TIMEOUT:-900}" script -qefc "bats --tap $f; /rig/rt/leftovers" /dev/null 2>&1 < /dev/null |
        sed -u "s#\r\$##; s#^#RB|$RB_RUNTIME|$f|#"
    kill "$holders" 2>/dev/null; wait "$holders" 2>/dev/null
    echo "RB|$RB_RUNTIME|$f|# end after $(awk -v s="$t0" '{printf "%.1f", $1 - s}' /proc/uptime) s"
    echo "RB|$RB_RUNTIME|$f|# processes left: $(ps -eo comm= | grep -c -e kata-snap -e runc) runtime, L1 memory free $(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo) MiB"
done
echo "RIG: runc-bats: $RB_RUNTIME took $(awk -v s="$start" '{printf "%.1f", $1 - s}' /proc/uptime) s in L1 (emulated)"
exit 0
