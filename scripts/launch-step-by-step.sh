#!/usr/bin/env bash
# Launch an SNP guest ioctl by ioctl with grpcurl, in the order QEMU launches one over KVM
# (target/i386/sev.c): KVM_CREATE_VM, KVM_SEV_INIT2, a guest_memfd and memslots, KVM_CREATE_VCPU,
# KVM_SEV_SNP_LAUNCH_START, KVM_SET_MEMORY_ATTRIBUTES + KVM_SEV_SNP_LAUNCH_UPDATE for each run of
# launch pages, KVM_SEV_SNP_LAUNCH_FINISH. Prints the measurement (hex) and the VM id.
#
#   scripts/launch-step-by-step.sh [FIRMWARE] [MEMORY_MIB] [VCPUS]
#
# KVM (host:port, default 127.0.0.1:50073), CREDENTIAL (the host credential file, default
# .snpemu/host-credential), GRPCURL and PYTHON (default .venv/bin/...) come from the environment.
set -euo pipefail
FIRMWARE=${1:-/usr/share/OVMF/OVMF_CODE.fd}
MEMORY=$(( ${2:-256} << 20 ))
VCPUS=${3:-1}
KVM=${KVM:-127.0.0.1:50073}
GRPCURL=${GRPCURL:-.venv/bin/grpcurl}
PYTHON=${PYTHON:-.venv/bin/python}
H="x-snpemu-host-credential: $(cat "${CREDENTIAL:-.snpemu/host-credential}")"
HVA=139637976727552          # 0x7F0000000000: where this "VMM" has guest memory
FW_SIZE=$(stat -c %s "$FIRMWARE")
FW_GPA=$(( (1 << 32) - FW_SIZE ))  # the firmware ends at 4 GiB

k() { "$GRPCURL" -plaintext -H "$H" -d @ "$KVM" "snp.kvm.v1.KvmService/$1"; }
field() { "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$1"; }

vm_id=$(echo '{"vm_type": 4}' | k CreateVm | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["vm"]["id"])')
VM="\"vm\": {\"id\": \"$vm_id\"}"
echo "{$VM}" | k SnpInit2 >/dev/null
# one guest_memfd for RAM (memslot 0, from GPA 0) and the firmware (memslot 1, at its end)
fd=$(echo "{$VM, \"size\": \"$(( MEMORY + FW_SIZE ))\"}" | k CreateGuestMemfd | field fd)
echo "{$VM, \"slot\": 0, \"flags\": 4, \"guest_phys_addr\": \"0\", \"memory_size\": \"$MEMORY\",
  \"userspace_addr\": \"$HVA\", \"guest_memfd\": $fd}" | k SetMemoryRegion >/dev/null
echo "{$VM, \"slot\": 1, \"flags\": 4, \"guest_phys_addr\": \"$FW_GPA\", \"memory_size\": \"$FW_SIZE\",
  \"userspace_addr\": \"$(( HVA + FW_GPA ))\", \"guest_memfd\": $fd,
  \"guest_memfd_offset\": \"$MEMORY\"}" | k SetMemoryRegion >/dev/null
# the APs start at the firmware's SEV-ES reset block
reset_eip=$("$PYTHON" -c 'import sys; from snpemu.vmm.ovmf import Ovmf; print(Ovmf.load(sys.argv[1]).reset_eip)' "$FIRMWARE")
for (( i = 0; i < VCPUS; i++ )); do
  eip=$(( i ? reset_eip : 0 ))
  echo "{$VM, \"vcpu_id\": $i, \"reset_eip\": $eip, \"vcpu_type\": \"VCPU_TYPE_EPYC_MILAN\"}" |
    k CreateVcpu >/dev/null
done
echo "{$VM, \"policy\": \"196608\"}" | k SnpLaunchStart >/dev/null
pages=$(mktemp -d)
trap 'rm -rf "$pages"' EXIT
"$PYTHON" -m snpemu.vmm.walkthrough "$FIRMWARE" --vm-id "$vm_id" --out "$pages"
for f in "$pages"/*.json; do
  method=${f##*_}
  left=$(k "${method%.json}" <"$f" | field len)
  # KVM may do fewer pages than asked (a memslot's end, 4096 pages a call): these runs each
  # lie in one memslot and are at most 4096 pages
  [ -z "$left" ] || { echo "$f: $left bytes left undone" >&2; exit 1; }
done
measurement=$(echo "{$VM}" | k SnpLaunchFinish | field measurement)
echo "$measurement" | base64 -d | od -An -tx1 -v | tr -d ' \n'
echo " $vm_id"
