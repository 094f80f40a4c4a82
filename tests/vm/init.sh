#!/bin/sh
# /init of the thinpool test VM (busybox sh, PID 1). Put into the initramfs by tests/vm/run.
#
# The guest cannot hand an exit code back to the host, so everything the host needs is
# printed to the serial console as "@@@ THINPOOL-VM ..." marker lines, which tests/vm/run
# parses. PID 1 must never exit (that is a kernel panic): every path ends in `poweroff -f`.
#
# Inputs:
#   kernel command line: thinpool.mode=tests|bench|conformance  thinpool.phase=1|2
#   /thinpool-vm/bins            tests mode: "ID PATH" per test binary
#   /thinpool-vm/args-pN-ID      libtest args for binary ID in phase N, one per line
#                                (no file: the binary has nothing to run in this phase)
#   /thinpool-vm/bench           bench mode: path of the vmbench binary (conformance mode: of
#                                the Go conformance test binary, run the same way)
#   /thinpool-vm/bench-args      its args, one per line
#   /thinpool-vm/env             extra KEY=VALUE lines to export (THINPOOL_VM_ENV on the host)

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

marker() { echo "@@@ THINPOOL-VM $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# Tidy up and power off. `poweroff -f` skips init scripts; it is a power cut for anything
# that has not been synced, hence the sync first.
finish() {
    cd /
    sync
    # The whole kernel log goes to the second serial port, which the host writes to
    # work/dmesg-boot<N>.log (the console only shows errors: "quiet").
    if [ -c /dev/ttyS1 ]; then dmesg >/dev/ttyS1; else dmesg; fi
    if grep -q " /mnt/disk " /proc/mounts; then
        # Fails (EBUSY) when tests left loop/dm devices on files of the disk active; then the
        # guest just powers off after the sync above, like a power cut after a sync.
        umount /mnt/disk 2>/dev/null || echo "note: umount /mnt/disk failed (devices still active?); powering off after sync"
    fi
    sync
    marker "BOOT-END phase=$PHASE mode=$MODE uptime=$(uptime_s)"
    poweroff -f
    sleep 5
    echo o > /proc/sysrq-trigger   # last resort if poweroff did not work
}

fatal() {
    marker "FATAL $*"
    finish
}

# Kernel parameter "thinpool.KEY=VALUE" from /proc/cmdline (the kernel ignores unknown dotted
# parameters, they reach only us).
cmdline_param() {
    # shellcheck disable=SC2013  # words, not lines
    for word in $(cat /proc/cmdline); do
        case "$word" in "thinpool.$1="*) echo "${word#*=}"; return ;; esac
    done
}

setup_mounts() {
    mkdir -p /proc /sys /dev /tmp /run /mnt/disk /root
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev
    mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts
    mount -t tmpfs tmpfs /dev/shm
    # No tmpfs over /tmp: the initramfs root is already writable memory, and the test
    # binaries are staged at their host paths, which are under /tmp when CI clones there.
    mount -t tmpfs tmpfs /run
    [ -e /etc/mtab ] || ln -s /proc/self/mounts /etc/mtab
}

load_modules() {
    # Required modules: failing to load one of them is fatal. modprobe pulls dependencies
    # (dm-persistent-data, dm-bio-prison, dm-bufio, libcrc32c, virtio, virtio_ring, ...)
    # from modules.dep. xfs takes 0.6 s to load under TCG, so it loads on the second vCPU
    # while the rest happens; main waits for it before the tests start.
    # Keep these lists in step with REQUIRED_MODULES/OPTIONAL_MODULES in tests/vm/run (only
    # modules listed there are in the initramfs).
    modprobe xfs &
    XFS_PID=$!
    for m in loop dm-mod dm-thin-pool virtio_pci virtio_blk; do
        modprobe "$m" || fatal "modprobe $m failed"
    done
    # Optional: fault injection targets and the faster crc32c.
    for m in dm-flakey dm-delay dm-zero dm-log-writes crc32c-intel; do
        modprobe "$m" 2>/dev/null || echo "note: optional module $m not loaded"
    done
}

mount_disk() {
    # virtio_blk probes asynchronously; give /dev/vda up to 10 s to appear.
    i=0
    while [ ! -b /dev/vda ]; do
        i=$((i + 1))
        [ $i -gt 100 ] && fatal "/dev/vda did not appear within 10 s"
        sleep 0.1
    done
    mount -t ext4 /dev/vda /mnt/disk || fatal "mount /dev/vda failed"
    # Direct I/O on loop devices fails on tmpfs, so scratch files must live on the disk.
    mkdir -p /mnt/disk/tmp /mnt/disk/tests
}

setup_env() {
    export THINPOOL_TEST_BACKEND=dm
    export THINPOOL_TEST_DIR=/mnt/disk/tests
    export THINPOOL_TEST_REBOOT_PHASE="$PHASE"
    export RUST_BACKTRACE=1
    export TMPDIR=/mnt/disk/tmp
    if [ -f /thinpool-vm/env ]; then
        while IFS= read -r kv || [ -n "$kv" ]; do
            # shellcheck disable=SC2163  # exports the KEY=VALUE that $kv holds
            [ -n "$kv" ] && export "$kv"
        done < /thinpool-vm/env
    fi
}

run_tests() {
    [ -f /thinpool-vm/bins ] || fatal "/thinpool-vm/bins missing"
    while read -r id path; do
        argfile="/thinpool-vm/args-p$PHASE-$id"
        [ -f "$argfile" ] || continue
        # libtest args, one per line (test names never contain newlines)
        set --
        while IFS= read -r a || [ -n "$a" ]; do set -- "$@" "$a"; done < "$argfile"
        marker "BIN-BEGIN $id phase=$PHASE uptime=$(uptime_s) path=$path args: $*"
        # --color=never: the console is a tty, and colour codes would break the parsing.
        (cd "$TMPDIR" && "$path" --test-threads=1 --color=never "$@") </dev/null 2>&1
        rc=$?
        marker "BIN-END $id rc=$rc uptime=$(uptime_s)"
    done < /thinpool-vm/bins
}

run_bench() {
    bench=$(cat /thinpool-vm/bench)
    set --
    if [ -f /thinpool-vm/bench-args ]; then
        while IFS= read -r a || [ -n "$a" ]; do set -- "$@" "$a"; done < /thinpool-vm/bench-args
    fi
    # Keep kernel messages off the console while the bench prints its table.
    dmesg -n 1
    marker "BENCH-BEGIN path=$bench uptime=$(uptime_s) args: $*"
    (cd "$TMPDIR" && "$bench" "$@") </dev/null 2>&1
    rc=$?
    marker "BENCH-END rc=$rc uptime=$(uptime_s)"
}

main() {
    setup_mounts
    PHASE=$(cmdline_param phase)
    MODE=$(cmdline_param mode)
    : "${PHASE:=1}" "${MODE:=tests}"
    marker "INIT-START phase=$PHASE mode=$MODE uptime=$(uptime_s) kernel=$(uname -r)"
    load_modules
    mount_disk
    wait "$XFS_PID" || fatal "modprobe xfs failed"
    setup_env
    marker "READY uptime=$(uptime_s)"
    case "$MODE" in
        tests) run_tests ;;
        bench) run_bench ;;
        # containerd's conformance suite (tests/vm/run --conformance): the bench runner with
        # the Go test binary; the daemons' pools go on the disk, outside the suite's dirs.
        conformance) export THINPOOL_CONFORMANCE_DIR=/mnt/disk/conformance; run_bench ;;
        *) fatal "unknown mode $MODE" ;;
    esac
    finish
}

main
# not reached; keep PID 1 alive in case poweroff returned
while :; do sleep 3600; done
