#!/bin/sh
# A stand-in for tidevm that exercises the harness without a VMM: "run"
# prints the guest's ready line and serves a shell on stdin/stdout the way a
# guest's serial console would (minus the tty echo); "ctl" answers at once.
if [ "$1" = ctl ]; then
    echo "fake-ctl: $*"
    exit 0
fi
echo "fake-tidevm: $*"
echo TIDEVM-GUEST-READY
# poweroff must end this shell, not the lane's host.
echo 'poweroff() { exit 0; }' > fake-env
PS1='tidevm-guest# ' ENV="$PWD/fake-env" exec sh -i 2>&1
