#!/bin/sh
# Start a VM whose network card is the vfiouser-net device NAME, served on
# /run/vfiouser-net/NAME.sock (by vfiouser-net@NAME.socket or the host-wide
# daemon). Run it as a user in group kvm (or root). Settings come from the
# environment; arguments are appended to QEMU's command line:
#
#     NAME=vm1 DISK=/var/lib/vms/vm1.qcow2 sh deploy/qemu/example.sh
#     NAME=vm1 DISK= ACCEL=tcg sh deploy/qemu/example.sh -kernel vmlinuz -initrd initrd.img
#     NAME=vm1 DISK= NETBOOT=pxe sh deploy/qemu/example.sh     # boot from the network
#
# What matters for vfiouser-net:
#   * guest RAM is a shared memfd (memory-backend-memfd with share=on, used as
#     the machine's memory-backend): QEMU passes its file descriptor over the
#     socket and the daemon maps it to reach the rings and the packets.
#     Without share=on the device cannot work.
#   * the device is `vfio-user-pci` (QEMU >= 10.1) with the socket given as
#     JSON. Something must listen on the socket when QEMU starts (the socket
#     unit or the daemon): QEMU connects once and does not reconnect.
set -eu

NAME=${NAME:-vm1}
SOCKET=${SOCKET:-/run/vfiouser-net/$NAME.sock}
MEMORY=${MEMORY:-2G}
CPUS=${CPUS:-2}
# The boot disk; DISK= (empty) for none.
DISK=${DISK-/var/lib/vms/$NAME.qcow2}
QEMU=${QEMU:-qemu-system-x86_64}
# kvm, or tcg where /dev/kvm is missing or does not work.
ACCEL=${ACCEL:-kvm}

# The device, a PCI device on the q35 root bus (QEMU picks the slot). More
# properties: "x-msg-timeout" (ms, default 5000) bounds every reply QEMU waits
# for; "bus"/"addr" place it.
DEVICE=$(printf '{"driver":"vfio-user-pci","id":"vfiouser-net0","socket":{"path":"%s","type":"unix"}' "$SOCKET")
# Network boot through the device: QEMU's iPXE option ROM for virtio-net on it
# and first in the boot order. NETBOOT=pxe for SeaBIOS (pxe-virtio.rom),
# NETBOOT=efi for OVMF (efi-virtio.rom; add OVMF's -drive if=pflash lines).
# The device itself has no ROM: QEMU serves the file as its expansion ROM.
case ${NETBOOT:-} in
    pxe) DEVICE="$DEVICE,\"romfile\":\"pxe-virtio.rom\",\"bootindex\":1" ;;
    efi) DEVICE="$DEVICE,\"romfile\":\"efi-virtio.rom\",\"bootindex\":1" ;;
    "") ;;
    *) echo "NETBOOT must be pxe, efi or empty" >&2; exit 2 ;;
esac
DEVICE="$DEVICE}"

if [ -n "$DISK" ]; then
    set -- -drive "if=virtio,format=qcow2,file=$DISK" "$@"
fi

exec "$QEMU" \
    -name "$NAME" \
    -accel "$ACCEL" \
    -machine q35,memory-backend=mem \
    -cpu max \
    -smp "$CPUS" \
    -m "$MEMORY" \
    -object "memory-backend-memfd,id=mem,size=$MEMORY,share=on" \
    -device "$DEVICE" \
    -nodefaults \
    -nographic \
    -serial mon:stdio \
    "$@"
