#!/usr/bin/env bash
# Measures kata-snap against runc's OWN integration suite: the bats tests of the runc that Debian
# bookworm ships (1.1.5, source package runc 1.1.5+ds1-1+deb12u1), run as root in the L1 rig
# (scripts/rig/l1.sh) once with RUNC=runc and once with RUNC=kata-snap. A measurement, not a gate.
#
#   - runc's source comes from Debian's archive, as any user could get it: a private apt
#     configuration with a deb-src entry for bookworm, `apt-get source --download-only`, then
#     `dpkg-source -x` (signatures and checksums checked by apt and dpkg), cached under
#     ${KATA_SNAP_CACHE:-~/.cache/kata-snap}/runc-src/. None of its files are committed here.
#   - the suite's helpers recvtty and seccompagent are built from that source with Debian's Go
#     (golang-go and the golang-*-dev packages runc's own -dev package depends on), GOPATH mode.
#   - get-images.sh would download busybox and Debian images from the internet: instead the busybox
#     rootfs tarball is built from the local busybox-static, and the staged copy of the suite gets a
#     get-images.sh that only names it. There is no Debian image (only hooks.bats needs one): those
#     tests fail for both runtimes (environment). So does anything that needs gcc in L1 (dev.bats,
#     seccomp.bats: two tests each compile a static C helper) or criu (checkpoint.bats: skipped).
#   - both runtimes run through one wrapper named `runc` that adds `--no-pivot` to run/create
#     (L1's root is an initramfs, where pivot_root fails); runc's no_pivot test passes it itself.
#
# Usage: scripts/rig/runc-bats.sh                 fetch, build what is missing, run, summarize
#        scripts/rig/runc-bats.sh --report DIR    summarize again the console logs a run left in DIR
# Env:   BATS_FILES        the .bats files to run, e.g. "version.bats help.bats" (default: all)
#        RUNTIMES          "runc kata-snap" (default), or one of them
#        KATA_SNAP_BIN     a kata-snap binary to measure (default: cargo build --release here)
#        RUNC_BATS_LOG_DIR where the console logs, TAP files and summary go (default: a temp dir)
#        RIG_TIMEOUT       bound on each L1 run, QEMU start to exit (default 3600 s)
#        RIG_MEM           L1 memory in MiB (default 6144)
#        RUNC_BATS_PARALLEL=1  both L1 runs at once (each takes one host core)
#        RB_TEST_TIMEOUT   bound on each test (default 180 s), RB_FILE_TIMEOUT on each file (900 s)
#        RUNC_DEB_VERSION  the Debian source version to fetch (default 1.1.5+ds1-1+deb12u1)
# Exit status: 0 when every runtime asked for produced results; 125 when the rig failed.
# Prints "SKIPPED: reason" and exits 0 when the rig cannot run here (no QEMU, no L1 kernel).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
cache="${KATA_SNAP_CACHE:-$HOME/.cache/kata-snap}"
ver="${RUNC_DEB_VERSION:-1.1.5+ds1-1+deb12u1}"
srccache="$cache/runc-src"
runtimes="${RUNTIMES:-runc kata-snap}"
step() { printf 'runc-bats: %s\n' "$*" >&2; }
skip() { echo "SKIPPED: $*"; exit 0; }

kata_snap="${KATA_SNAP_BIN:-}" kata_snap_rev=""
if [ "${1:-}" = --report ]; then
    # Only the summary, from the console logs an earlier run left in DIR.
    logdir="${2:?--report DIR}"
    runtimes="$(for rt in $runtimes; do [ -f "$logdir/$rt.console.log" ] && echo "$rt"; done | tr '\n' ' ')"
    [ -n "$runtimes" ] || { step "no console logs in $logdir"; exit 125; }
else
# --- the rig can run here? --------------------------------------------------------------------
command -v qemu-system-x86_64 >/dev/null || skip "no qemu-system-x86_64 (apt-get install qemu-system-x86)"
[ -s "$cache/linux/vmlinuz" ] && [ -s "$cache/linux/modules/load-order" ] ||
    scripts/fetch-linux-kernel.sh >/dev/null 2>&1 || true
[ -s "$cache/linux/vmlinuz" ] && [ -s "$cache/linux/modules/load-order" ] ||
    skip "no L1 kernel with KVM modules (scripts/fetch-linux-kernel.sh failed)"
[ "$(id -u)" = 0 ] || skip "needs root (apt-get for the suite's tools; runc's suite runs as root)"

# --- packages ---------------------------------------------------------------------------------
# bats (bats-core 1.8.2), jq and GNU tools for the suite; Go and the runc -dev package (which
# pulls in the Go libraries runc builds with) for recvtty and seccompagent; runc, erofs-utils and
# busybox-static for the runtimes and the busybox image.
pkgs="bats jq golang-go golang-github-opencontainers-runc-dev libseccomp-dev dpkg-dev busybox-static
      runc erofs-utils coreutils procps util-linux bsdutils findutils grep sed tar xz-utils mawk bash cpio"
missing=""
for p in $pkgs; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"; done
if [ -n "$missing" ]; then
    step "installing:$missing"
    apt-get update -qq >&2 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >&2
fi

# --- runc's source, through Debian's archive ----------------------------------------------------
src="$srccache/runc-$ver"
if [ ! -f "$src/tests/integration/helpers.bash" ]; then
    step "fetching runc $ver's source from Debian's archive (deb-src bookworm)"
    apt_dir="$srccache/apt"
    mkdir -p "$apt_dir/sources" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$srccache/dl"
    cat > "$apt_dir/sources/bookworm-src.sources" <<EOF
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/sources"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o "Dir::State::status=/dev/null"
        -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" update -qq >&2
    (cd "$srccache/dl" && apt-get "${apt_opts[@]}" source --download-only "runc=$ver" >&2)
    rm -rf "$src.tmp"
    dpkg-source -x "$srccache/dl/runc_$ver.dsc" "$src.tmp" >&2
    rm -rf "$src" && mv "$src.tmp" "$src"
fi

# --- the suite's helpers, built from that source ------------------------------------------------
helpers="$srccache/bin-$ver"
if [ ! -x "$helpers/recvtty" ] || [ ! -x "$helpers/seccompagent" ]; then
    step "building recvtty and seccompagent (runc's contrib/cmd) with Debian's Go"
    gopath="$srccache/gopath"
    rm -rf "$gopath" && mkdir -p "$gopath/src/github.com/opencontainers" "$helpers"
    ln -s "$src" "$gopath/src/github.com/opencontainers/runc"
    for c in recvtty seccompagent; do
        (cd "$gopath/src/github.com/opencontainers/runc" &&
            GOPATH="$gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOCACHE="$srccache/gocache" \
            go build -tags seccomp -o "$helpers/$c" "./contrib/cmd/$c") >&2
    done
fi

# --- the busybox image the suite expects, from busybox-static -----------------------------------
image="$srccache/busybox-rootfs.tar"
if [ ! -s "$image" ] || [ /bin/busybox -nt "$image" ]; then
    step "busybox rootfs tarball from /bin/busybox (busybox-static)"
    bb="$(mktemp -d)"
    mkdir -p "$bb"/{bin,dev,etc,home,proc,root,sys,tmp,usr/sbin,var/spool/mail,var/www}
    chmod 755 "$bb"; chmod 1777 "$bb/tmp"; chmod 700 "$bb/root"
    cp /bin/busybox "$bb/bin/busybox"
    for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$bb/bin/$a"; done
    # The users and groups of the busybox image runc's get-images.sh names (docker-library).
    cat > "$bb/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
EOF
    printf '%s\n' root:x:0: daemon:x:1: bin:x:2: sys:x:3: adm:x:4: tty:x:5: disk:x:6: lp:x:7: \
        mail:x:8: kmem:x:9: wheel:x:10:root cdrom:x:11: dialout:x:18: floppy:x:19: video:x:28: \
        audio:x:29: tape:x:32: www-data:x:33: operator:x:37: utmp:x:43: plugdev:x:46: staff:x:50: \
        lock:x:54: netdev:x:82: users:x:100: nogroup:x:65534: > "$bb/etc/group"
    tar --owner=0 --group=0 --numeric-owner -C "$bb" -cf "$image.tmp" . && mv "$image.tmp" "$image"
    rm -rf "$bb"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/runc-bats.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- kata-snap and its guest --------------------------------------------------------------------
if [[ " $runtimes " == *" kata-snap "* ]]; then
    step "guest kernel (guest/kernel/build.sh, skipped when cached)"
    kernel_dir="$(JOBS="${JOBS:-$(nproc)}" nice -n 10 guest/kernel/build.sh | tail -n 1)"
    step "agent initramfs (guest/initramfs/build.sh)"
    initramfs="$(guest/initramfs/build.sh 2>/dev/null | tail -n 1)" || { guest/initramfs/build.sh >&2; exit 125; }
    # The cache's copy is rewritten by any checkout's build: keep this one's.
    cp "$initramfs" "$work/initramfs.cpio" && initramfs="$work/initramfs.cpio"
    if [ -z "$kata_snap" ]; then
        step "kata-snap (cargo build --release)"
        nice -n 10 cargo build --release --locked --bin kata-snap >&2
        kata_snap="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/kata-snap"
        kata_snap_rev=" (built at $(git rev-parse --short HEAD), code of $(git log -1 --format='%h %cs' -- . ':!scripts' ':!docs')$(git diff --quiet HEAD -- . ':!scripts' ':!docs' || echo ', with local changes'))"
    fi
    [ -x "$kata_snap" ] || { step "no kata-snap binary at $kata_snap"; exit 125; }
fi

# --- the staged suite ---------------------------------------------------------------------------
mkdir -p "$work/integration"
cp -a "$src/tests/integration/." "$work/integration/"
# The only change to runc's suite: images are local (no download, no `go env`).
cat > "$work/integration/get-images.sh" <<'EOF'
#!/bin/sh
# runc-bats.sh: the busybox image is built locally from busybox-static; there is no Debian image.
echo BUSYBOX_IMAGE=/rig/images/busybox.tar
echo DEBIAN_IMAGE=/rig/images/debian-not-available.tar
EOF
chmod +x "$work/integration/get-images.sh"
if [ -n "${BATS_FILES:-}" ]; then files="$BATS_FILES"; else
    files="$(cd "$work/integration" && ls -- *.bats | tr '\n' ' ')"; fi

tools=()
for t in $(dpkg -L coreutils | grep -E '^/(usr/)?s?bin/') /bin/bash /usr/bin/jq /bin/tar /usr/bin/xz \
    /bin/gzip /bin/grep /bin/sed /usr/bin/find /usr/bin/xargs /bin/ps /usr/bin/pgrep /usr/bin/pkill \
    /usr/bin/script /usr/bin/nsenter /usr/bin/unshare /usr/bin/setsid /usr/bin/flock /usr/bin/getopt /bin/findmnt \
    /bin/mountpoint /usr/bin/bats; do
    [ -f "$t" ] && tools+=(--bin "$t=/rig/tools/bin/$(basename "$t")")
done
tools+=(--bin "/usr/bin/mawk=/rig/tools/bin/awk")
# bats finds its libexec and lib relative to itself: /rig/tools/bin/bats -> /rig/tools/{lib,libexec}.
tools+=(--dir /usr/lib/bats-core=/rig/tools/lib/bats-core --dir /usr/libexec/bats-core=/rig/tools/libexec/bats-core)

logdir="${RUNC_BATS_LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/runc-bats-logs.XXXXXX")}"
mkdir -p "$logdir"
step "suite: $(echo $files | wc -w) files; logs in $logdir"

run_one() { # run_one RUNTIME: one L1 boot, the suite with RUNC=that runtime
    local rt="$1" real extra=()
    case "$rt" in
        runc) real=/usr/sbin/runc ;;
        kata-snap) real=/rig/bin/kata-snap
            extra=(--bin "$kata_snap=/rig/bin/kata-snap" --bin /usr/bin/mkfs.erofs
                --file "$kernel_dir/bzImage=/rig/guest/bzImage" --file "$initramfs=/rig/guest/initramfs.cpio"
                --env KATA_SNAP_GUEST_KERNEL=/rig/guest/bzImage --env KATA_SNAP_GUEST_INITRAMFS=/rig/guest/initramfs.cpio) ;;
    esac
    step "$rt: running the suite in L1 (console: $logdir/$rt.console.log)"
    scripts/rig/l1.sh --quiet --timeout "${RIG_TIMEOUT:-3600}" --mem "${RIG_MEM:-6144}" --log "$logdir/$rt.console.log" \
        --bin /usr/sbin/runc "${extra[@]}" "${tools[@]}" \
        --dir "$work/integration=/rig/runc-src/tests/integration" \
        --bin "$helpers/recvtty=/rig/runc-src/contrib/cmd/recvtty/recvtty" \
        --bin "$helpers/seccompagent=/rig/runc-src/contrib/cmd/seccompagent/seccompagent" \
        --file "$src/contrib/cmd/seccompagent/gen-seccomp-example-cfg.sh=/rig/runc-src/contrib/cmd/seccompagent/gen-seccomp-example-cfg.sh" \
        --file "$image=/rig/images/busybox.tar" \
        --env "RB_RUNTIME=$rt" --env "RB_REAL=$real" --env "RB_FILES=$files" \
        --env "RB_TEST_TIMEOUT=${RB_TEST_TIMEOUT:-180}" --env "RB_FILE_TIMEOUT=${RB_FILE_TIMEOUT:-900}" \
        scripts/rig/runc-bats-in-l1.sh
}
for rt in $runtimes; do
    case "$rt" in runc|kata-snap) ;; *) step "unknown runtime $rt"; exit 125 ;; esac
done
set +e
if [ "${RUNC_BATS_PARALLEL:-0}" = 1 ]; then
    pids=()
    for rt in $runtimes; do run_one "$rt" & pids+=($!); done
    wait "${pids[@]}"
else
    for rt in $runtimes; do run_one "$rt"; done
fi
set -e
fi # the runs (not with --report)

# --- summary, from the console logs -------------------------------------------------------------
failed_rig=0
for rt in $runtimes; do
    tr -d '\r' < "$logdir/$rt.console.log" | awk -F'|' -v rt="$rt" '
        $1 == "RB" && $2 == rt { f = $3; line = substr($0, length($1 $2 $3) + 4)
            if (f != cur) { print "# file: " f; cur = f } print line }' > "$logdir/$rt.tap"
    grep -q '^ok \|^not ok ' "$logdir/$rt.tap" || { step "$rt: no results (see $logdir/$rt.console.log)"; failed_rig=1; }
done
# One line per test: RUNTIME FILE NUMBER STATUS NAME, tab-separated; STATUS ok | fail | skip |
# missing (planned, never reported: the file or the whole run was cut short).
results="$logdir/results.tsv"
for rt in $runtimes; do
    awk -v rt="$rt" '
        function flush() { if (f != "") for (i = 1; i <= plan; i++) if (!(i in seen)) printf "%s\t%s\t%d\tmissing\t\n", rt, f, i }
        /^# file: / { flush(); f = substr($0, 9); plan = 0; delete seen; next }
        /^1\.\.[0-9]+$/ { plan = substr($0, 4) + 0; next }
        /^(not )?ok [0-9]+ / {
            st = ($1 == "not") ? "fail" : "ok"; num = ($1 == "not") ? $3 : $2
            name = $0; sub(/^(not )?ok [0-9]+ /, "", name)
            if (name ~ / # [sS][kK][iI][pP]/) st = "skip"
            sub(/ # ([sS][kK][iI][pP]|timeout).*$/, "", name)
            seen[num + 0] = 1; printf "%s\t%s\t%d\t%s\t%s\n", rt, f, num, st, name }
        END { flush() }' "$logdir/$rt.tap"
done > "$results"

{
    echo "runc's integration suite (Debian's runc $ver) in the L1 rig (QEMU TCG, emulated timings)"
    [ -n "$kata_snap" ] && echo "kata-snap: $kata_snap$kata_snap_rev"
    for rt in $runtimes; do
        echo
        echo "$rt:$(tr -d '\r' < "$logdir/$rt.console.log" | sed -n 's/^RIG: runc-bats: .* took \(.*\) in L1.*/ \1 in L1/p')"
        awk -F'\t' -v rt="$rt" '$1 == rt { n[$2, $4]++; tot[$4]++; if (!($2 in seen)) { seen[$2]; order[k++] = $2 } }
            END { printf "  %-28s %4s %6s %4s %7s\n", "file", "ok", "not ok", "skip", "missing"
                  for (i = 0; i < k; i++) { f = order[i]
                      printf "  %-28s %4d %6d %4d %7s\n", f, n[f, "ok"], n[f, "fail"], n[f, "skip"], (n[f, "missing"] ? n[f, "missing"] : "") }
                  printf "  %-28s %4d %6d %4d %7s\n", "TOTAL", tot["ok"], tot["fail"], tot["skip"], (tot["missing"] ? tot["missing"] : "") }' "$results"
    done
    if [[ " $runtimes " == *" runc "* && " $runtimes " == *" kata-snap "* ]]; then
        echo
        echo "pass with runc, fail with kata-snap (not ok, or never reported: missing):"
        awk -F'\t' '$1 == "runc" { name[$2, $3] = $5; if ($4 == "ok") ok[$2, $3] = 1 }
            $1 == "kata-snap" && ($4 == "fail" || $4 == "missing") && (($2, $3) in ok) {
                n++; printf "  %s: %s%s\n", $2, name[$2, $3], ($4 == "missing" ? " (missing)" : "") }
            END { printf "  (%d tests)\n", n }' "$results"
        echo
        echo "not ok with runc too (the rig's environment, or runc):"
        awk -F'\t' '$1 == "runc" && ($4 == "fail" || $4 == "missing") { n++; printf "  %s: %s\n", $2, $5 }
            END { printf "  (%d tests)\n", n }' "$results"
    fi
} | tee "$logdir/summary.txt"
echo "runc-bats: TAP: $logdir/{$(echo $runtimes | tr ' ' ',')}.tap; per test: $results; consoles: $logdir/*.console.log"
[ "$failed_rig" = 0 ] || exit 125
exit 0
