#!/bin/bash
# imgbuild promote: run on the Chroma instance through SSM Run Command after AWS Backup restored a
# recovery point into a new file system. AWS Backup never restores over the root of an EFS file
# system: a full restore lands in a directory aws-backup-restore_<datetime> off the root (AWS
# Backup Developer Guide, "Restore an Amazon EFS file system"). Chroma's boot serves <efs>/data
# only, so this mounts the new file system at a path of its own and moves the restored data there:
# the consistent copy `imgbuild backup` made when the point has one, else the live data directory
# as the scheduled backup caught it. The live file system is never touched. The last line of
# output is the result imgbuild reads.
set -euo pipefail

root="${IMGBUILD_ROOT:-}"
readonly fs_id="${IMGBUILD_FILE_SYSTEM_ID:?}"
readonly mount_at="${root}${IMGBUILD_RESTORE_MOUNT:?}"
readonly data_subdir="${IMGBUILD_DATA_SUBDIR:?}"
readonly version_name="${IMGBUILD_VERSION_NAME:?}"
readonly copy_name="${IMGBUILD_COPY_NAME:?}"
readonly token="${IMGBUILD_TOKEN:?}"

log() { echo "imgbuild-promote: $*" >&2; }
fail() {
  log "$*"
  echo "IMGBUILD_RESULT status=failed token=${token}"
  exit 1
}
cleanup() {
  if mountpoint -q "${mount_at}"; then umount "${mount_at}" || log "unmounting ${mount_at} failed"; fi
}
trap cleanup EXIT

install -d -m 0700 "${mount_at}"
if ! mountpoint -q "${mount_at}"; then
  # The storage mode's own way: efs-tls has amazon-efs-utils (TLS, IAM), docker-nfs plain NFS.
  read -ra mount_args <<< "${IMGBUILD_MOUNT_ARGS:?}"
  timeout 120 mount "${mount_args[@]}" "${mount_at}" || fail "mounting ${fs_id} on ${mount_at} failed"
fi
mountpoint -q "${mount_at}" || fail "${fs_id} is not mounted on ${mount_at}"

if [[ -e "${mount_at}/${data_subdir}" ]]; then
  fail "${fs_id} already has a ${data_subdir} directory at its root: it is not a fresh restore; nothing was moved"
fi
restored=()
for d in "${mount_at}"/aws-backup-restore_*; do
  [[ -d "${d}" ]] && restored+=("${d}")
done
[[ ${#restored[@]} -eq 1 ]] || fail "expected one aws-backup-restore_* directory on ${fs_id}, found ${#restored[@]}"
from="${restored[0]}"

if [[ -d "${from}/${copy_name}/${data_subdir}" ]]; then
  source_dir="${from}/${copy_name}/${data_subdir}" kind=consistent
  version_from="${from}/${copy_name}/${version_name}"
elif [[ -d "${from}/${data_subdir}" ]]; then
  source_dir="${from}/${data_subdir}" kind=live
  version_from="${from}/${version_name}"
else
  fail "the restored file system holds no Chroma data (${copy_name}/${data_subdir} or ${data_subdir})"
fi
version=""
if [[ -s "${version_from}" ]]; then
  version=$(head -n 1 "${version_from}")
  cp -a "${version_from}" "${mount_at}/${version_name}"
fi
# A rename on the same file system: instant, and never half done.
mv "${source_dir}" "${mount_at}/${data_subdir}"
sync
echo "IMGBUILD_RESULT status=ok token=${token} kind=${kind} version=${version} from=${from##*/}"
