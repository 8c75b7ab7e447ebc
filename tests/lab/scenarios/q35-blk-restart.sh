# blk-restart on the q35 machine: the killed backend serves a virtio-blk-pci card.
RESTART_Q35=1
. /lab/scenarios/blk-restart.sh
