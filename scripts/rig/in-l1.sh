# Runs inside the L1 VM (scripts/rig/l1.sh, started by scripts/rig/rung4.sh): the rung-4 test
# binary with the arguments given, after a check that kata-snap sees a hardware-style KVM.
echo "RIG: $(/rig/linux_e2e --list 2>/dev/null | grep -c ': test$') tests in /rig/linux_e2e"
start=$(cut -d' ' -f1 /proc/uptime)
/rig/linux_e2e "$@"
rc=$?
echo "RIG: tests took $(awk -v s="$start" '{printf "%.1f", $1 - s}' /proc/uptime) s in L1 (emulated)"
exit $rc
