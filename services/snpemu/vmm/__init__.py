"""What the VMM (QEMU) lays out for an SNP launch: firmware image, metadata pages, VMSAs."""
