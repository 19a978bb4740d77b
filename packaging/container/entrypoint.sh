#!/bin/sh
# Start this device's software TPM (state kept with the device's state), then dmagent.
set -eu
state="${DMAGENT_STATE_DIR:-/var/lib/dmagent}"
mkdir -p "$state/tpm"
if [ "${DMAGENT_TPM_TCTI:-}" != "" ] && [ "${DMAGENT_NO_SWTPM:-0}" != "1" ]; then
  swtpm socket --tpm2 --tpmstate "dir=$state/tpm" \
    --server type=tcp,port=2321,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 \
    --flags not-need-init,startup-clear --daemon
fi
exec dmagent "$@"
