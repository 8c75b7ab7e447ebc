# snapshot on the q35 machine: its PCI segment, a virtio-blk-pci card and its MSI-X state
# saved and restored into two VMs at once.
SNAPSHOT_Q35=1
. /lab/scenarios/snapshot.sh
