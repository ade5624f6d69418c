# Runs inside the L1 VM (scripts/rig/l1.sh, started by scripts/rig/rung4.sh): the rung-4 test
# binary with the arguments given, RIG_REPEAT times (default 1; stops at the first failure).
echo "RIG: $(/rig/linux_e2e --list 2>/dev/null | grep -c ': test$') tests in /rig/linux_e2e; kvm_amd $(grep -H . /sys/module/kvm_amd/parameters/vgif /sys/module/kvm_amd/parameters/nested 2>/dev/null | sed 's|.*/||' | tr '\n' ' ')"
start=$(cut -d' ' -f1 /proc/uptime)
rc=0
i=0
while [ $i -lt "${RIG_REPEAT:-1}" ] && [ $rc -eq 0 ]; do
    i=$((i + 1))
    [ "${RIG_REPEAT:-1}" -gt 1 ] && echo "RIG: run $i of $RIG_REPEAT"
    /rig/linux_e2e "$@"
    rc=$?
done
echo "RIG: tests took $(awk -v s="$start" '{printf "%.1f", $1 - s}' /proc/uptime) s in L1 (emulated)"
exit $rc
