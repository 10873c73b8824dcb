#!/bin/sh
# Run by amplitude-export-failure.service when amplitude-export.service fails: says so in the journal at priority
# err, and where a mail command exists, mails the last lines of the newest log to $MAILTO (default root).
# Usage: on-failure.sh [LOG_DIR]   (default: the logs/ folder beside this script's folder)
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
log_dir=${1:-$here/logs}
latest=$(ls -1t "$log_dir"/log_*.log 2>/dev/null | head -n 1)
message="The nightly Amplitude export failed; log: ${latest:-none found in $log_dir}"
logger -p user.err -t amplitude-export "$message"
if command -v mail >/dev/null 2>&1; then
    { echo "$message"; echo; [ -n "$latest" ] && tail -n 50 "$latest"; } |
        mail -s "Amplitude export failed on $(hostname)" "${MAILTO:-root}"
fi
exit 0
