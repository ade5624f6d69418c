#!/usr/bin/env bash
# Check a built kernel .config: every option in required-options.txt must be =y
# (kconfig silently drops options whose dependencies are missing), and
# CONFIG_MODULES / CONFIG_PCI must be off.
# Usage: guest/kernel/check-config.sh PATH/TO/.config
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:?usage: check-config.sh PATH/TO/.config}"
missing=0
while read -r opt; do
    [[ -z "$opt" || "$opt" == \#* ]] && continue
    if ! grep -qx "$opt=y" "$config"; then
        echo "missing: $opt=y (have: $(grep -E "^(# )?$opt[= ]" "$config" || echo 'absent'))" >&2
        missing=1
    fi
done <"$here/required-options.txt"
for opt in CONFIG_MODULES CONFIG_PCI; do
    if grep -qx "$opt=y" "$config"; then
        echo "forbidden: $opt=y" >&2
        missing=1
    fi
done
if ((missing)); then
    echo "error: $config lacks required options" >&2
    exit 1
fi
echo "ok: $config has every required option" >&2
