# Debian's unmodified cloud kernel (a bzImage with ACPI and no MP-table parser, the same one L1
# runs) boots to user space under Citadel with 1, 2 and 4 vCPUs.
for smp in 1 2 4; do
	boot_and_report stock$smp /lab/stock/vmlinuz $smp 90
done
